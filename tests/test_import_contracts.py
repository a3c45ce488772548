"""The import contracts `make lint` checks (pyproject.toml, [tool.importlinter]) hold, and a wrong-way
import breaks them: each case adds one such import to a copy of the tree and runs lint-imports on it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports puts its working directory first on sys.path: it analyses the copy, not the install.
    return subprocess.run([str(LINT_IMPORTS)], cwd=tree, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for package in ("service", "trainer", "client"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "verdict"),
    [
        (
            "service/embeddings/embedder.py",
            "from service.rollouts.store import RolloutWatcher",
            "service.embeddings is not allowed to import service.rollouts",
        ),
        (
            "service/vectors/store.py",
            "from service.embeddings.embedder import Embedder",
            "service.vectors is not allowed to import service.embeddings",
        ),
        (
            "service/models/store.py",
            "from service.telemetry.metrics import Metrics",
            "service.models is not allowed to import service.telemetry",
        ),
        ("service/embeddings/batcher.py", "import torch", "service is not allowed to import torch"),
        (
            "trainer/train.py",
            "from trainer.release.export import export_version",
            "trainer.train is not allowed to import trainer.release",
        ),
        (
            "service/models/manifest.py",
            "from service.edge.auth import require",
            "service.models.manifest is not allowed to import fastapi",
        ),
        ("client/evaluate.py", "import fastapi", "client is not allowed to import fastapi"),
        ("client/gateway.py", "from service.vectors.store import VectorStore", "client is not allowed to import"),
        ("service/vectors/fusion.py", "import pymilvus", "service.vectors.fusion is not allowed to import pymilvus"),
        ("service/vectors/fusion.py", "from service.errors import ApiError", "is not allowed to import service.errors"),
    ],
)
def test_a_wrong_way_import_fails_lint(tree: Path, module: str, wrong_import: str, verdict: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{wrong_import}  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert verdict in " ".join(result.stdout.split()), result.stdout
