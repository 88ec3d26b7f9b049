"""jaxsparse: sparsity in neural networks with JAX, optax and flax.

Public modules: :mod:`~jaxsparse.masks`, :mod:`~jaxsparse.structure`,
:mod:`~jaxsparse.groups` (units traced from a model, shrink),
:mod:`~jaxsparse.neurons` (data-driven unit criteria),
:mod:`~jaxsparse.layerwise` (OBC and SparseGPT from calibration inputs),
:mod:`~jaxsparse.ephemeral` (sparse activations, errors and gradients),
:mod:`~jaxsparse.distribution`, :mod:`~jaxsparse.saliency`. The names most
used are re-exported here.
"""

from jaxsparse import blocks as blocks
from jaxsparse import curvature as curvature
from jaxsparse import data as data
from jaxsparse import distribution as distribution
from jaxsparse import ephemeral as ephemeral
from jaxsparse import fisher as fisher
from jaxsparse import formats as formats
from jaxsparse import groups as groups
from jaxsparse import layerwise as layerwise
from jaxsparse import masks as masks
from jaxsparse import neurons as neurons
from jaxsparse import obs as obs
from jaxsparse import regularizers as regularizers
from jaxsparse import reports as reports
from jaxsparse import saliency as saliency
from jaxsparse import schedules as schedules
from jaxsparse import selection as selection
from jaxsparse import sparse_export as sparse_export
from jaxsparse import spectrum as spectrum
from jaxsparse import storage as storage
from jaxsparse import structure as structure
from jaxsparse import transforms as transforms
from jaxsparse import variational as variational
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
from jaxsparse.distribution import topk_mask as topk_mask
from jaxsparse.groups import Groups as Groups
from jaxsparse.groups import shrink as shrink
from jaxsparse.groups import trace as trace
from jaxsparse.groups import trace_module as trace_module
from jaxsparse.masks import apply_mask as apply_mask
from jaxsparse.masks import check_finite as check_finite
from jaxsparse.masks import dense_mask as dense_mask
from jaxsparse.masks import effective_mask as effective_mask
from jaxsparse.reports import LeafSparsity as LeafSparsity
from jaxsparse.reports import SparsityReport as SparsityReport
from jaxsparse.reports import sparsity as sparsity
from jaxsparse.reports import sparsity_report as sparsity_report
from jaxsparse.selection import global_mask as global_mask
from jaxsparse.selection import layerwise_mask as layerwise_mask
from jaxsparse.structure import NM as NM
from jaxsparse.structure import Block as Block
from jaxsparse.structure import Channel as Channel
from jaxsparse.structure import Element as Element
from jaxsparse.structure import Granularity as Granularity
from jaxsparse.structure import Strided as Strided
from jaxsparse.transforms import KeepMaskedState as KeepMaskedState
from jaxsparse.transforms import PruneState as PruneState
from jaxsparse.transforms import SparsifyState as SparsifyState
from jaxsparse.transforms import dynamic_sparse as dynamic_sparse
from jaxsparse.transforms import keep_masked as keep_masked
from jaxsparse.transforms import prune as prune
from jaxsparse.transforms import rigl as rigl
from jaxsparse.transforms import sparse_evolutionary as sparse_evolutionary
from jaxsparse.transforms import sparsify as sparsify

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
    "Groups",
    "KeepMaskedState",
    "KeyPath",
    "LeafSelector",
    "LeafSparsity",
    "Mask",
    "NM",
    "Params",
    "PruneState",
    "Scores",
    "SparsifyState",
    "Sparsity",
    "SparsityReport",
    "SparsityTree",
    "Strided",
    "Uniform",
    "apply_mask",
    "blocks",
    "check_finite",
    "curvature",
    "data",
    "dense_mask",
    "distribution",
    "dynamic_sparse",
    "effective_mask",
    "fisher",
    "formats",
    "global_mask",
    "groups",
    "keep_masked",
    "layerwise",
    "layerwise_mask",
    "masks",
    "neurons",
    "obs",
    "prune",
    "regularizers",
    "reports",
    "rigl",
    "saliency",
    "schedules",
    "selection",
    "shrink",
    "sparse_evolutionary",
    "sparse_export",
    "sparsify",
    "sparsity",
    "sparsity_report",
    "spectrum",
    "storage",
    "structure",
    "topk_mask",
    "trace",
    "trace_module",
    "transforms",
    "variational",
)
