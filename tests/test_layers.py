"""The layers, read statically (ast, nothing imported): the core ``metarestore/`` reaches no package above it,
and nothing below the command-line application reaches ``metarestore_cli``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UPPER = ("training", "serving", "evaluation", "cluster", "metarestore_cli")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module an ``import`` or ``from ... import`` names, wherever it is (top level or in
    a function): lazy imports count too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def reaches(path: Path, packages: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(REPO)}:{line} imports {name}" for line, name in imported_modules(path)
            if name.split(".")[0] in packages]


def test_the_walk_sees_lazy_and_nested_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef f():\n    from training.driver import x\n    import serving.app as s\n")
    assert [name for _, name in imported_modules(sample)] == ["os", "training.driver", "serving.app"]


@pytest.mark.parametrize("package,forbidden", [
    ("metarestore", UPPER),  # the core
    ("training", ("serving", "evaluation", "metarestore_cli")),
    ("serving", ("training", "evaluation", "metarestore_cli")),
    ("evaluation", ("serving", "training", "metarestore_cli")),
    ("cluster", ("training", "serving", "evaluation", "metarestore_cli")),
])
def test_no_package_reaches_above_its_layer(package, forbidden):
    modules = sorted((REPO / package).rglob("*.py"))
    assert modules, package
    crossings = [c for path in modules for c in reaches(path, forbidden)]
    assert not crossings, "\n".join(crossings)


def test_the_config_and_the_parameter_groups_are_leaves_without_torch():
    """Reading a config file names no network: ``metarestore.config`` and ``metarestore.param_groups`` import
    no torch, and the model and learner name the config's types for type checkers only (no import cycle)."""
    import subprocess
    import sys

    code = "import sys, metarestore.config, metarestore.param_groups; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for module in ("metarestore/model/network.py", "metarestore/meta/learner.py"):
        tree = ast.parse((REPO / module).read_text())
        top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "metarestore.config"]
        assert not top, f"{module} imports metarestore.config at run time"
