"""Selection over NamedSharding params equals the unsharded selection.

XLA fixes the device count when JAX starts, so the 8 virtual CPU devices live
in a subprocess (tests/sharded_check.py) that runs both mesh axis types."""

from pathlib import Path

import pytest
from virtual_devices import run_script

SCRIPT = Path(__file__).with_name("sharded_check.py")


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sharded_selection_is_identical(axis_type):
    out = run_script("sharded_check.py", axis_type)
    assert f"{axis_type}: sharded selection identical" in out
