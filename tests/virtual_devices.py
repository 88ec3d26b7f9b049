"""Runs a test script in a process of its own with 8 virtual CPU devices
(XLA fixes the device count when JAX starts)."""

import os
import subprocess
import sys
from pathlib import Path


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    """Runs ``tests/<name>`` with ``args``; fails the test on a non-zero
    exit, showing its output, and returns its stdout."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(name)), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
