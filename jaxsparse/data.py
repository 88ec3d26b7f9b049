"""Embedded datasets: nothing is downloaded at run time.

References:
  Alpaydin & Kaynak 1998, optical recognition of handwritten digits (UCI),
  as shipped with scikit-learn (``sklearn.datasets.load_digits``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """A train/test split of features ``x`` (float32) and labels ``y`` (int32)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """The 1,797 8x8 handwritten digits, standardized, split by ``seed``.

    Features are scaled with the training split's mean and standard
    deviation; the split is stratified by class so every seed sees every
    digit in both parts.

    Args:
      seed: seeds the permutation that makes the split.
      test_fraction: fraction of each class held out, in ``(0, 1)``.

    Returns:
      A :class:`Split` with 64 features per example and 10 classes.

    Example:
      >>> split = digits(0)
      >>> split.x_train.shape, split.x_test.shape, split.num_classes
      ((1347, 64), (450, 64), 10)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test[idx[: round(test_fraction * len(idx))]] = True
    x = x.astype(np.float32)
    mean = x[~test].mean(0)
    std = x[~test].std(0) + 1e-3
    x = (x - mean) / std
    train_order = rng.permutation(np.flatnonzero(~test))
    test_order = np.flatnonzero(test)
    return Split(
        x[train_order],
        y[train_order].astype(np.int32),
        x[test_order],
        y[test_order].astype(np.int32),
    )
