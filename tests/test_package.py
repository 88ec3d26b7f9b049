"""The package as users meet it: public names, citation, README and CI."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import jaxsparse as js

ROOT = Path(__file__).resolve().parents[1]


def test_all_is_sorted_and_documented():
    assert list(js.__all__) == sorted(js.__all__)
    for name in js.__all__:
        obj = getattr(js, name)
        if name[0].isupper() and name in {
            "KeyPath",
            "LeafSelector",
            "Mask",
            "Params",
            "Scores",
            "Sparsity",
            "SparsityTree",
        }:
            continue  # type aliases are documented in _types.py
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
    assert re.fullmatch(r"\d+\.\d+\.\d+", js.__version__)


def test_citation_cff():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    for key in ("cff-version", "message", "title", "authors", "version", "license"):
        assert cff.get(key), key
    assert cff["cff-version"] == "1.2.0"
    assert cff["version"] == js.__version__
    assert cff["license"] == "Apache-2.0"
    (survey,) = cff["references"]
    assert [a["family-names"] for a in survey["authors"]] == [
        "Hoefler",
        "Alistarh",
        "Ben-Nun",
        "Dryden",
        "Peste",
    ]
    assert survey["journal"] == "Journal of Machine Learning Research"
    assert (survey["volume"], survey["issue"], survey["year"]) == (22, 241, 2021)


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", text, re.S)[:2]


def test_readme_starts_with_two_commands_and_ci_runs_the_second():
    run, test = readme_commands()
    assert "python -m jaxsparse" in run and "pip install" in run
    assert test.rstrip().endswith("pytest") and "pip install" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert test.strip() in ci


def test_license_is_apache():
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]


def test_ruff_clean():
    ruff = pytest.importorskip("ruff")
    del ruff
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout
