"""The runner behind ``jaxsparse run CONFIG``: trains every method of a
config at every sparsity and seed, with progress, checkpoints and results
written as JSON and CSV.

Each run (method, target sparsity, seed) is deterministic: its initial
params, the transform's key and the order of the training examples in each
epoch follow from the seed alone, and a run resumed from a checkpoint ends
bitwise identical to one never interrupted.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from jaxsparse import _tree, data, schedules
from jaxsparse.experiments import post_training
from jaxsparse.experiments.config import MethodConfig, RunConfig
from jaxsparse.experiments.models import Model, model

_CRITERIA = {
    "magnitude": js.saliency.magnitude,
    "random": js.saliency.random,
    "taylor": js.saliency.taylor,
}
_DISTRIBUTIONS = {"uniform": js.Uniform(), "erk": js.ERK(), "global": js.Global()}
_EVAL_BATCH = 2048


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    import flax
    import jaxlib

    return {
        "python": platform.python_version(),
        "jaxsparse": js.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "backend": jax.default_backend(),
    }


def load_split(config: RunConfig, seed: int) -> data.Split:
    """The config's dataset (digits are split by ``seed``; MNIST's split is
    fixed)."""
    if config.dataset == "mnist":
        return data.mnist()
    return data.digits(seed)


def _optimizer(config: RunConfig) -> optax.GradientTransformation:
    base = {
        "adam": lambda: optax.adam(config.learning_rate),
        "sgd": lambda: optax.sgd(config.learning_rate),
        "momentum": lambda: optax.sgd(config.learning_rate, momentum=0.9),
    }[config.optimizer]()
    if config.weight_decay:
        # Decay added to the gradient: L2 regularization, as Han et al. train.
        return optax.chain(optax.add_decayed_weights(config.weight_decay), base)
    return base


def _steps(epochs: float, steps_per_epoch: int) -> int:
    return max(1, round(epochs * steps_per_epoch))


def _schedule(method: MethodConfig, target: float, epochs: int, per_epoch: int):
    """The method's schedule in steps (its times are given in epochs)."""
    defaults = {
        "one-shot": (0.5, None),
        "gradual": (0.1, 0.6),
        "iterative": (0.25, 0.75),
        "iht": (0.2, 0.8),
        "dsd": (1 / 3, 2 / 3),
    }[method.schedule]
    begin = method.begin if method.begin is not None else defaults[0] * epochs
    end = method.end if method.end is not None else (defaults[1] or 1.0) * epochs
    b, e = round(begin * per_epoch), _steps(end, per_epoch)
    if method.schedule == "one-shot":
        return schedules.constant(target, at=b)
    if method.schedule == "gradual":
        every = method.every if method.every is not None else (end - begin) / 25
        return schedules.polynomial(
            0.0, target, begin=b, end=e, every=_steps(every, per_epoch)
        )
    if method.schedule == "iterative":
        n = method.rounds
        at = [b + round(i * (e - b) / max(n - 1, 1)) for i in range(n)]
        return schedules.iterative(
            [(t, target * (i + 1) / n) for i, t in enumerate(at)]
        )
    if method.schedule == "iht":
        phase = max(1, (e - b) // (2 * method.cycles))
        return schedules.iht(
            target,
            warmup=b,
            sparse_steps=phase,
            dense_steps=phase,
            cycles=method.cycles,
        )
    return schedules.dsd(target, dense_steps=max(b, 1), sparse_steps=max(e - b, 1))


def _distribution(method: MethodConfig) -> js.Distribution:
    if isinstance(method.distribution, str):
        return _DISTRIBUTIONS[method.distribution]
    return js.Custom(method.distribution)


def build_transform(
    config: RunConfig,
    method: MethodConfig,
    target: float,
    seed: int,
    steps_per_epoch: int,
) -> optax.GradientTransformation:
    """The optax transform that trains ``method`` at ``target`` sparsity."""
    opt = _optimizer(config)
    if method.method in ("dense", "post-training"):
        return opt
    distribution = _distribution(method)
    if method.method in ("rigl", "set"):
        make = js.rigl if method.method == "rigl" else js.sparse_evolutionary
        every = method.every if method.every is not None else config.epochs / 40
        end = method.end if method.end is not None else 0.75 * config.epochs
        return make(
            opt,
            target,
            every=_steps(every, steps_per_epoch),
            end=_steps(end, steps_per_epoch),
            key=seed,
            drop_fraction=method.drop_fraction,
            distribution=distribution,
        )
    schedule = _schedule(method, target, config.epochs, steps_per_epoch)
    criterion = _CRITERIA[method.criterion]
    if method.method == "sparsify":
        return js.sparsify(
            opt, criterion, schedule, distribution=distribution, key=seed
        )
    return optax.chain(
        opt, js.prune(criterion, schedule, distribution=distribution, key=seed)
    )


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _accuracy(apply, params, x, y) -> float:
    correct = 0
    for i in range(0, len(y), _EVAL_BATCH):
        logits = apply(params, x[i : i + _EVAL_BATCH])
        correct += int(jnp.sum(jnp.argmax(logits, -1) == y[i : i + _EVAL_BATCH]))
    return correct / len(y)


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of a config: a method at one target sparsity and seed."""

    method: MethodConfig
    target: float
    seed: int

    @property
    def label(self) -> str:
        return f"{self.method.name} {self.target:.0%} seed {self.seed}"

    @property
    def slug(self) -> str:
        name = "".join(c if c.isalnum() else "-" for c in self.method.name)
        return f"{name}-{self.target:g}-seed{self.seed}"


def fingerprint(config: RunConfig, job: Job) -> dict[str, Any]:
    """What a checkpoint of ``job`` must have been written with: every
    setting that changes its training (not the other methods or seeds, nor
    how often it is saved)."""
    settings = config.as_dict()
    for key in ("name", "seeds", "methods", "checkpoint_every", "study"):
        settings.pop(key)
    method = config.as_dict()["methods"][config.methods.index(job.method)]
    return {**settings, "method": method, "target": job.target, "seed": job.seed}


def initial_state(
    config: RunConfig,
    job: Job,
    net: Model,
    features: int,
    classes: int,
    steps_per_epoch: int,
) -> tuple[optax.GradientTransformation, dict[str, Any]]:
    """A run's transform and its state before the first step (the tree a
    checkpoint of the run must fit)."""
    params = net.init(
        jax.random.fold_in(jax.random.key(job.seed), 0), features, classes
    )
    tx = build_transform(config, job.method, job.target, job.seed, steps_per_epoch)
    opt = tx.init(params)
    state = {
        "params": params,
        "opt": opt,
        "step": jnp.zeros((), jnp.int32),
        "data_seed": jnp.asarray(job.seed, jnp.int32),
    }
    if job.method.method not in ("dense", "post-training"):
        # The mask at the last evaluation, so each one reports how much of
        # the mask the updates since then moved (a resumed run included).
        state["eval_mask"] = js.effective_mask(opt)
    return tx, state


def train(
    config: RunConfig,
    job: Job,
    split: data.Split,
    net: Model,
    *,
    checkpoint_dir: Path | None = None,
    stop_at_step: int | None = None,
    report: Callable[[dict[str, Any]], None] = lambda _: None,
) -> dict[str, Any] | None:
    """Trains one method at one sparsity and seed; returns its result row.

    Args:
      config: the checked config.
      job: the method, target and seed.
      split: the data.
      net: the model.
      checkpoint_dir: where this run's checkpoints go (resumed from when
        one is there); ``None`` saves none.
      stop_at_step: stop after this many steps as a killed process would
        (the state goes only to the checkpoints); for testing resumption.
      report: called with a progress record after each evaluation.

    Returns:
      The result row, or ``None`` when stopped early.
    """
    start = time.perf_counter()
    n, features = split.x_train.shape
    per_epoch = n // config.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"config batch_size: {config.batch_size} is more than the "
            f"{n} training examples"
        )
    total = config.epochs * per_epoch
    tx, state = initial_state(config, job, net, features, split.num_classes, per_epoch)
    history: list[dict[str, Any]] = []
    checkpoints = None
    if checkpoint_dir is not None and config.checkpoint_every:
        from jaxsparse.experiments.checkpoints import Checkpoints

        checkpoints = Checkpoints(checkpoint_dir, fingerprint(config, job))
        if checkpoints.latest() is not None:
            _, state, extra = checkpoints.restore(state)
            history = extra["history"]

    def loss(params, x, y):
        logits = net.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(state, x, y, idx):
        xb, yb = jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)
        grads = jax.grad(loss)(state["params"], xb, yb)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {**state, "params": params, "opt": opt, "step": state["step"] + 1}

    x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
    x_test, y_test = jnp.asarray(split.x_test), jnp.asarray(split.y_test)
    apply = jax.jit(net.apply)
    t = int(state["step"])
    order = None
    while t < total:
        epoch, i = divmod(t, per_epoch)
        if order is None or i == 0:
            order = _epoch_order(int(state["data_seed"]), epoch, n)
        idx = jnp.asarray(order[i * config.batch_size : (i + 1) * config.batch_size])
        state = step(state, x, y, idx)
        t += 1
        if t % per_epoch == 0 and (t // per_epoch) % config.eval_every == 0:
            record = {
                "epoch": t // per_epoch,
                "step": t,
                "sparsity": float(js.sparsity(state["params"])),
                "accuracy": _accuracy(apply, state["params"], x_test, y_test),
            }
            if "eval_mask" in state:
                mask = js.effective_mask(state["opt"])
                moved = js.schedules.mask_distance(state["eval_mask"], mask)
                record["mask_change"] = float(moved)
                state = {**state, "eval_mask": mask}
            history.append(record)
            report({**record, "total": total})
        if checkpoints is not None and (t % config.checkpoint_every == 0 or t == total):
            checkpoints.save(t, state, {"history": history})
        if stop_at_step is not None and t >= stop_at_step and t < total:
            return None
    params = state["params"]
    acc = _accuracy(apply, params, x_test, y_test)
    sparsity = js.sparsity_report(params)
    return {
        "method": job.method.name,
        "kind": job.method.method,
        "target": job.target,
        "seed": job.seed,
        "sparsity": float(js.sparsity(params)),
        "accuracy": acc,
        "error": 1.0 - acc,
        "nonzeros": sparsity.nonzeros,
        "size": sparsity.size,
        "steps": total,
        "seconds": time.perf_counter() - start,
        "layers": {leaf.path: leaf.sparsity for leaf in sparsity.leaves},
        "history": history,
        "params": params,
    }


def _pattern(method: MethodConfig) -> js.Element | js.NM:
    nm = method.n_m
    return js.Element() if nm is None else js.NM(*nm, axis=0)


def check_post_training(config: RunConfig, net: Model, features: int, classes: int):
    """Refuses, before any training, a post-training method whose N:M
    pattern does not divide a kernel it would prune (naming the kernel), or
    whose ``include`` selects no kernel."""
    shapes = jax.eval_shape(lambda k: net.init(k, features, classes), jax.random.key(0))
    # Leaf selection looks at arrays: zeros of the params' shapes stand in.
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    for i, method in enumerate(config.methods):
        if method.method != "post-training":
            continue
        where = f"config methods[{i}]"
        chosen = [
            (_tree.path_str(path), leaf)
            for path, leaf in _tree.selected(params, method.include)
        ]
        if not chosen:
            raise ValueError(
                f"{where}.include: {method.include!r} selects no kernel of "
                f"{config.model}"
            )
        nm = method.n_m
        for path, leaf in chosen:
            rows = math.prod(leaf.shape[:-1])
            if nm is not None and rows % nm[1]:
                raise ValueError(
                    f"{where}.pattern: {path} has {rows} inputs, not divisible by "
                    f"m={nm[1]} of {method.pattern}; leave it out with include"
                )


def prune_trained(
    job: Job,
    dense: dict[str, Any],
    split: data.Split,
    net: Model,
    pruner: post_training.OneShot,
) -> dict[str, Any]:
    """The row of a post-training job: the dense run's row with its params
    pruned once by ``pruner`` (``seconds`` is the pruning's own time)."""
    start = time.perf_counter()
    params = jax.block_until_ready(
        pruner.prune(None if job.method.n_m is not None else job.target)
    )
    seconds = time.perf_counter() - start
    acc = _accuracy(
        jax.jit(net.apply), params, jnp.asarray(split.x_test), jnp.asarray(split.y_test)
    )
    report = js.sparsity_report(params)
    return {
        **dense,
        "method": job.method.name,
        "kind": job.method.method,
        "target": job.target,
        "sparsity": float(js.sparsity(params)),
        "accuracy": acc,
        "error": 1.0 - acc,
        "dense_accuracy": dense["accuracy"],
        "nonzeros": report.nonzeros,
        "size": report.size,
        "seconds": seconds,
        "train_seconds": dense["seconds"],
        "curvature_seconds": pruner.seconds,
        "layers": {leaf.path: leaf.sparsity for leaf in report.leaves},
        "params": params,
    }


def _jobs(config: RunConfig) -> list[Job]:
    jobs = []
    for method in config.methods:
        for target in method.targets or (0.0,):
            for seed in config.seeds:
                jobs.append(Job(method, target, seed))
    return jobs


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def run_training(
    config: RunConfig,
    *,
    checkpoint_root: Path | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
) -> list[dict[str, Any]]:
    """Every run of a training config; returns the result rows (each with
    its final ``params``)."""
    net = model(config.model, config.hidden)
    splits: dict[int, data.Split] = {}
    # Dense training is the same for every post-training method (and the
    # dense method) of a seed: it runs once, and each pruner's curvature
    # once per seed.
    dense_rows: dict[int, dict[str, Any]] = {}
    pruners: dict[tuple[int, str], post_training.OneShot] = {}
    rows = []

    def split_of(job: Job) -> data.Split:
        seed = 0 if config.dataset == "mnist" else job.seed
        if seed not in splits:
            splits[seed] = load_split(config, seed)
        return splits[seed]

    jobs = _jobs(config)
    first = split_of(jobs[0])
    check_post_training(config, net, first.x_train.shape[1], first.num_classes)
    with _progress(progress) as bars:
        for job in jobs:
            split = split_of(job)
            total = config.epochs * (len(split.y_train) // config.batch_size)
            task = bars.add_task(job.label, total=total, status="")

            def report(record, task=task):
                moved = record.get("mask_change")
                bars.update(
                    task,
                    completed=record["step"],
                    status=f"epoch {record['epoch']}, sparsity "
                    f"{record['sparsity']:.1%}, accuracy {record['accuracy']:.2%}"
                    + ("" if moved is None else f", mask moved {moved:.1%}"),
                )

            method = job.method
            reuse = method.method in ("dense", "post-training")
            row = dense_rows.get(job.seed) if reuse else None
            if row is None:
                row = train(
                    config,
                    job,
                    split,
                    net,
                    checkpoint_dir=None
                    if checkpoint_root is None
                    else checkpoint_root / job.slug,
                    stop_at_step=stop_at_step,
                    report=report,
                )
                if row is None:
                    continue
                if reuse:
                    dense_rows[job.seed] = {**row, "method": "dense", "kind": "dense"}
            if method.method == "post-training":
                key = (job.seed, method.name)
                if key not in pruners:
                    bars.update(task, status=f"preparing {method.pruner}")
                    pruners[key] = post_training.one_shot_pruner(
                        method.pruner,
                        net.apply,
                        row["params"],
                        jnp.asarray(split.x_train[: method.calibration]),
                        jnp.asarray(split.y_train[: method.calibration]),
                        pattern=_pattern(method),
                        distribution=_distribution(method),
                        include=method.include,
                    )
                row = prune_trained(job, row, split, net, pruners[key])
            elif method.method == "dense":
                row = {**row, "method": method.name}
            bars.update(task, completed=total)
            rows.append(row)
    return rows


def _study_rows(config: RunConfig) -> list[dict[str, Any]]:
    from jaxsparse.experiments import (
        one_shot,
        regularized,
        schedule_comparison,
        second_order,
        structured,
    )

    study = dict(config.study)
    seeds = list(config.seeds)
    if config.experiment == "one-shot":
        rows = []
        for seed in seeds:
            got = one_shot.run(one_shot.Config(seed=seed, **study))
            rows += [{"method": r.criterion, "seed": seed, **r._asdict()} for r in got]
        return rows
    if config.experiment == "schedules":
        sparsity = study.pop("sparsity", 0.9)
        got = schedule_comparison.run_schedules(
            one_shot.Config(**study), seeds, sparsity
        )
        return [{**r._asdict(), "target": sparsity} for r in got]
    if config.experiment == "second-order":
        got = second_order.run_second_order(
            seeds, study.get("sparsities", (0.5, 0.8, 0.9, 0.95))
        )
        return [{**r._asdict(), "target": r.sparsity} for r in got]
    if config.experiment == "regularized":
        got = regularized.run_regularized(seeds)
        # No target: each method reaches the sparsity its strength gives.
        return [
            {**r._asdict(), "target": None, "sparsity": r.weight_sparsity} for r in got
        ]
    got = structured.run_structured(seeds)
    return [
        {
            **r._asdict(),
            "method": f"{r.model}/{r.criterion}",
            "target": r.removed,
            "sparsity": r.removed,
            "accuracy": r.finetuned_accuracy,
        }
        for r in got
    ]


_CSV_FIELDS = ("method", "target", "seed", "sparsity", "accuracy")


def write_results(
    config: RunConfig, rows: list[dict[str, Any]], out: Path, seconds: float
) -> tuple[Path, Path]:
    """Writes ``<name>.json`` (config, versions, rows with their histories)
    and ``<name>.csv`` (one line per row) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in r.items() if k != "params"} for r in rows]
    doc = {
        "name": config.name,
        "config": config.as_dict(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": seconds,
        "rows": clean,
    }
    json_path = out / f"{config.name}.json"
    json_path.write_text(json.dumps(doc, indent=1, default=_plain))
    csv_path = out / f"{config.name}.csv"
    scalar = [
        k
        for k in dict.fromkeys(k for r in clean for k in r)
        if all(not isinstance(r.get(k), dict | list) for r in clean)
    ]
    columns = [k for k in _CSV_FIELDS if k in scalar]
    columns += [k for k in scalar if k not in columns]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(clean)
    return json_path, csv_path


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | jax.Array):
        return np.asarray(value).tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def run(
    config: RunConfig,
    out: Path,
    *,
    checkpoints: Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Runs a config and writes its results into ``out``.

    Args:
      config: a checked config (:func:`~jaxsparse.experiments.config.load_config`).
      out: directory for ``<name>.json`` and ``<name>.csv``.
      checkpoints: root of the checkpoint directories (one per run); the
        default is ``out/<name>-checkpoints`` when the config sets
        ``checkpoint_every``.
      progress: show progress bars.

    Returns:
      The result rows.
    """
    start = time.perf_counter()
    if config.experiment == "train":
        if checkpoints is None and config.checkpoint_every:
            checkpoints = out / f"{config.name}-checkpoints"
        rows = run_training(config, checkpoint_root=checkpoints, progress=progress)
    else:
        rows = _study_rows(config)
    write_results(config, rows, out, time.perf_counter() - start)
    return rows
