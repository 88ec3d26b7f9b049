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


def _imports(path: Path):
    """``(module, name)`` for every ``from module import name`` and
    ``module.attribute`` use of an imported jaxsparse module in ``path``."""
    import ast

    tree = ast.parse(path.read_text())
    aliases = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "jaxsparse"
        ):
            for alias in node.names:
                found.append((node.module, alias.name))
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jaxsparse"):
                    aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            found.append((aliases[node.value.id], node.attr))
    return found


def test_no_module_reaches_for_a_private_name_of_another():
    """Private helpers live in private modules (``_tree``, ``_select``,
    ``_types``) under public names; no module imports ``_name`` from another."""
    private_modules = {p.stem for p in (ROOT / "jaxsparse").glob("_*.py")}
    for path in [*(ROOT / "jaxsparse").rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        for module, name in _imports(path):
            dunder = name.startswith("__") and name.endswith("__")
            assert not name.startswith("_") or name in private_modules or dunder, (
                f"{path.relative_to(ROOT)} uses {module}.{name}"
            )


def test_experiments_have_no_import_cycle():
    package = ROOT / "jaxsparse" / "experiments"
    graph = {}
    for path in package.glob("*.py"):
        name = f"jaxsparse.experiments.{path.stem}"
        graph[name] = {
            m if m.startswith("jaxsparse.experiments.") else f"{m}.{n}"
            for m, n in _imports(path)
            if m.startswith("jaxsparse.experiments")
        } & {f"jaxsparse.experiments.{p.stem}" for p in package.glob("*.py")}
    seen, stack = set(), []

    def visit(node):
        assert node not in stack, f"import cycle: {[*stack, node]}"
        if node in seen:
            return
        stack.append(node)
        for child in graph.get(node, ()):
            visit(child)
        stack.pop()
        seen.add(node)

    for node in graph:
        visit(node)
    assert "jaxsparse.experiments.cli" not in set().union(*graph.values())


def test_every_public_module_has_doctested_examples():
    """The test suite runs the doctests (``--doctest-modules``); every public
    module must have some."""
    import inspect

    for name in js.__all__:
        module = getattr(js, name)
        if not inspect.ismodule(module):
            continue
        documented = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and getattr(obj, "__module__", None) == module.__name__
            and ">>>" in (getattr(obj, "__doc__", None) or "")
        ]
        assert documented, f"jaxsparse.{name} has no doctested example"
