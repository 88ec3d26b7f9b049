"""jaxsparse: sparsity in neural networks with JAX, optax and flax.

Public modules: :mod:`~jaxsparse.masks`, :mod:`~jaxsparse.structure`,
:mod:`~jaxsparse.distribution`, :mod:`~jaxsparse.saliency`. The names most
used are re-exported here.
"""

from jaxsparse import distribution as distribution
from jaxsparse import masks as masks
from jaxsparse import saliency as saliency
from jaxsparse import structure as structure
from jaxsparse._types import KeyPath as KeyPath
from jaxsparse._types import LeafSelector as LeafSelector
from jaxsparse._types import Mask as Mask
from jaxsparse._types import Params as Params
from jaxsparse._types import Scores as Scores
from jaxsparse._types import Sparsity as Sparsity
from jaxsparse._types import SparsityTree as SparsityTree
from jaxsparse.distribution import ERK as ERK
from jaxsparse.distribution import Custom as Custom
from jaxsparse.distribution import Distribution as Distribution
from jaxsparse.distribution import Global as Global
from jaxsparse.distribution import Uniform as Uniform
from jaxsparse.masks import LeafSparsity as LeafSparsity
from jaxsparse.masks import SparsityReport as SparsityReport
from jaxsparse.masks import apply_mask as apply_mask
from jaxsparse.masks import check_finite as check_finite
from jaxsparse.masks import dense_mask as dense_mask
from jaxsparse.masks import global_mask as global_mask
from jaxsparse.masks import layerwise_mask as layerwise_mask
from jaxsparse.masks import sparsity as sparsity
from jaxsparse.masks import sparsity_report as sparsity_report
from jaxsparse.masks import topk_mask as topk_mask
from jaxsparse.structure import NM as NM
from jaxsparse.structure import Block as Block
from jaxsparse.structure import Channel as Channel
from jaxsparse.structure import Element as Element
from jaxsparse.structure import Granularity as Granularity
from jaxsparse.structure import Strided as Strided

__version__ = "0.1.0"

__all__ = (
    "Block",
    "Channel",
    "Custom",
    "Distribution",
    "ERK",
    "Element",
    "Global",
    "Granularity",
    "KeyPath",
    "LeafSelector",
    "LeafSparsity",
    "Mask",
    "NM",
    "Params",
    "Scores",
    "Sparsity",
    "SparsityReport",
    "SparsityTree",
    "Strided",
    "Uniform",
    "apply_mask",
    "check_finite",
    "dense_mask",
    "distribution",
    "global_mask",
    "layerwise_mask",
    "masks",
    "saliency",
    "sparsity",
    "sparsity_report",
    "structure",
    "topk_mask",
)
