"""The architecture is enforced, and the enforcement is live.

`.importlinter` holds the contracts (core pure, lab offline, runtime never imports
the lab, no cycles); `make test` runs `lint-imports` before pytest. Here each
contract is broken on purpose in a temporary copy of the tree, and lint-imports
must fail naming it; and no module hides an import inside a function unless it
says why (a deferred heavy optional dependency)."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.env import REPO

LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("router", "worker", "migrations")


def _copy(tmp: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp / ".importlinter")
    return tmp


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract():
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("router/core/cascade.py", "import worker.store.stages", "The decision core (router.core) imports no execution layer"),
    ("router/core/policy.py", "import router.lab.metrics", "The decision core (router.core) imports no execution layer"),
    ("router/core/signals.py", "import matplotlib", "The decision core (router.core) imports no execution layer"),
    ("router/lab/metrics.py", "import sqlalchemy", "The lab (router.lab) runs offline"),
    ("worker/queue/stage.py", "import router.lab.simulate", "The runtime never imports the lab"),
    ("router/core/attempt.py", "import router.core.cascade", "No import cycles"),
])
def test_breaking_a_contract_fails_the_lint(tmp_path, module, line, contract):
    root = _copy(tmp_path)
    assert _lint(root).returncode == 0  # the copy itself is clean
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # broken on purpose by the test\n")
    r = _lint(root)
    assert r.returncode != 0
    assert "Broken contracts" in r.stdout, r.stdout
    broken_section = " ".join(r.stdout.split("Broken contracts", 1)[1].split())  # names wrap across lines
    assert contract in broken_section, r.stdout


def _nested_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and "deferred" not in lines[inner.lineno - 1]:
                    found.append(f"{path.relative_to(REPO)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    return found


def test_imports_sit_at_module_top_unless_deferred_on_purpose():
    found = [f for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py")) for f in _nested_imports(p)]
    assert not found, "imports inside functions without a `deferred: why` comment:\n" + "\n".join(found)
