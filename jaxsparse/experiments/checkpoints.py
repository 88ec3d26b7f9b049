"""Checkpoints of a training run with orbax, refused when they are corrupt
or were written by another run.

A checkpoint holds every leaf of the run's state (params, optimizer and
transform state with its mask, schedule state and key, the step, the data
key) and a JSON record: the run's fingerprint (its config), each leaf's path,
shape and dtype, a SHA-256 of all the leaves' bytes, and whatever the run
keeps beside (its evaluation history). orbax writes each step into a
temporary directory and renames it when complete, and deletes the oldest of
``keep`` steps only after a newer one is complete, so a run killed while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxsparse import _tree


def _describe(state: Any) -> list[dict[str, Any]]:
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return [
        {
            "path": _tree.path_str(path),
            "shape": list(np.shape(leaf)),
            "dtype": str(np.asarray(leaf).dtype),
        }
        for path, leaf in leaves
    ]


def _digest(leaves: list[Any]) -> str:
    h = hashlib.sha256()
    for leaf in leaves:
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def _flat(state: Any) -> dict[str, Any]:
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


class Checkpoints:
    """The checkpoints of one run in ``directory``.

    Args:
      directory: where the steps are written (created if missing).
      fingerprint: what identifies the run (its config as plain data); a
        checkpoint written with another fingerprint is refused.
      keep: how many complete checkpoints to keep (at least 1).
    """

    def __init__(self, directory: str | Path, fingerprint: Any, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(1, keep), enable_async_checkpointing=False, create=True
            ),
        )

    def latest(self) -> int | None:
        """The last complete step saved, or ``None``."""
        self._manager.reload()
        return self._manager.latest_step()

    def save(self, step: int, state: Any, extra: Any = None) -> None:
        """Saves ``state`` (a pytree of arrays) and ``extra`` (JSON data) at
        ``step``; returns once the checkpoint is complete on disk."""
        leaves = jax.tree.leaves(state)
        record = {
            "fingerprint": self.fingerprint,
            "leaves": _describe(state),
            "sha256": _digest(leaves),
            "extra": extra,
        }
        self._manager.save(
            step,
            args=self._ocp.args.Composite(
                state=self._ocp.args.StandardSave(_flat(state)),
                record=self._ocp.args.JsonSave(record),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, like: Any, step: int | None = None) -> tuple[int, Any, Any]:
        """Reads a checkpoint into the tree of ``like``.

        Args:
          like: a state of the same tree, shapes and dtypes (a fresh init).
          step: the step to read (default: the latest).

        Returns:
          ``(step, state, extra)``.

        Raises:
          ValueError: there is no checkpoint; it was written by another run
            (naming the config key that differs) or for another model
            (naming the leaf); it cannot be read or its bytes do not match
            the digest saved with it.
        """
        step = self.latest() if step is None else step
        where = f"checkpoint {self.directory}"
        if step is None:
            raise ValueError(f"{where}: no complete checkpoint to resume from")
        where = f"{where} at step {step}"
        ocp = self._ocp
        try:
            record = self._manager.restore(
                step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
            )["record"]
        except Exception as err:
            raise ValueError(f"{where} is unreadable: {err}") from err
        if not isinstance(record, dict) or "fingerprint" not in record:
            raise ValueError(f"{where} is unreadable: its record is damaged")
        _same_run(record["fingerprint"], self.fingerprint, where)
        _same_tree(record["leaves"], _describe(like), where)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _flat(like))
        try:
            flat = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as err:
            raise ValueError(f"{where} is unreadable: {err}") from err
        leaves = [flat[k] for k in sorted(flat)]
        if _digest(leaves) != record["sha256"]:
            raise ValueError(
                f"{where} is corrupt: its arrays do not match the digest saved "
                "with them"
            )
        state = jax.tree.unflatten(jax.tree.structure(like), leaves)
        return step, state, record["extra"]


def _same_run(saved: Any, current: Any, where: str) -> None:
    if saved == current:
        return
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            if saved.get(key) != current.get(key):
                raise ValueError(
                    f"{where} was written by another run: {key!r} is "
                    f"{saved.get(key)!r} there and {current.get(key)!r} here"
                )
    raise ValueError(f"{where} was written by another run")


def _same_tree(saved: list, current: list, where: str) -> None:
    for a, b in zip(saved, current):
        if a != b:
            raise ValueError(
                f"{where} does not fit this run: leaf {b['path']} is "
                f"{b['dtype']}{b['shape']} here and {a['path']} "
                f"{a['dtype']}{a['shape']} there"
            )
    if len(saved) != len(current):
        raise ValueError(
            f"{where} does not fit this run: {len(saved)} leaves there, "
            f"{len(current)} here"
        )
