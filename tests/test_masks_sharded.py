"""Selection over NamedSharding params equals the unsharded selection.

XLA fixes the device count when JAX starts, so the 8 virtual CPU devices live
in a subprocess (tests/sharded_check.py) that runs both mesh axis types."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sharded_check.py")


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sharded_selection_is_identical(axis_type):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), axis_type],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{axis_type}: sharded selection identical" in result.stdout
