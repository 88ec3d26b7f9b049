"""Sparse training with params sharded over a (data, model) mesh of 8
virtual CPU devices equals the one-device run: the same mask at every step
on every device, the same params to float32 rounding, one compilation.
Across two processes (JAX's multi-process runtime, gloo collectives on
CPU) both hold the same masks and params, and processes that start from
different masks are stopped before any step.

XLA fixes the device count when JAX starts, so the run lives in a
subprocess (tests/sharded_training.py)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from virtual_devices import run_script


def run(axis_type, *models):
    out = run_script("sharded_training.py", axis_type, *models, timeout=900)
    assert f"{axis_type}: sharded training matches" in out
    return out


@pytest.mark.slow
def test_prune_and_rigl_train_an_mlp_sharded_as_on_one_device():
    out = run("Explicit", "mlp")
    assert "Explicit mlp prune: masks identical at every step" in out
    assert "Explicit mlp rigl: masks identical at every step" in out


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_the_mlp_and_lenet5_train_sharded_as_on_one_device(axis_type):
    out = run(axis_type, "mlp", "lenet-5")
    assert f"{axis_type} lenet-5 rigl: masks identical at every step" in out


MULTI = Path(__file__).with_name("multiprocess_training.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def two_processes(tmp_path, *extra):
    """Starts both processes of the run (JAX's own coordinator on a local
    port) and returns their exit codes and output."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(MULTI), str(pid), port, str(tmp_path), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for pid in (0, 1)
    ]
    outs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outs.append((proc.returncode, out))
    return outs


@pytest.mark.slow
def test_two_processes_train_with_the_same_masks_and_params(tmp_path):
    outs = two_processes(tmp_path)
    for pid, (code, out) in enumerate(outs):
        assert code == 0, out
        assert f"process {pid}: done" in out
    first = np.load(tmp_path / "process0.npz")
    second = np.load(tmp_path / "process1.npz")
    assert sorted(first.files) == sorted(second.files)
    assert any(k.startswith("rigl/mask") for k in first.files)
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    for transform in ("prune", "rigl"):
        kept = [first[k] for k in first.files if k.startswith(f"{transform}/mask")]
        assert np.mean(np.concatenate([m.ravel() for m in kept])) == pytest.approx(
            0.1, abs=0.01
        )


def test_processes_that_disagree_on_the_mask_stop_before_any_step(tmp_path):
    for code, out in two_processes(tmp_path, "disagree"):
        assert code != 0
        assert "ValueError" in out
        assert "hold different values of this mask" in out, out[-2000:]
    assert not (tmp_path / "process0.npz").exists()
