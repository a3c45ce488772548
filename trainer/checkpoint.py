"""Checkpoints written atomically with a sha256 beside each, at most K kept, verified before loading.

Layout: ``<dir>/step-00000100.pt`` and ``<dir>/step-00000100.pt.sha256``. A checkpoint is written to a
temporary file, fsynced, and renamed into place; its digest file is written the same way afterwards,
so a checkpoint without a digest file is one whose write did not finish and is ignored.
"""

import hashlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})\.pt$")


class CorruptCheckpoint(Exception):
    """A checkpoint whose bytes don't match its sha256; ``previous_good`` is the newest one that does."""

    def __init__(self, path: Path, previous_good: Path | None) -> None:
        offer = (
            f"the previous good checkpoint is {previous_good}: resume from it with --resume {previous_good}"
            if previous_good
            else "no earlier good checkpoint exists; start the run again"
        )
        super().__init__(f"checkpoint {path} does not match its sha256 (corrupt or truncated); {offer}.")
        self.path = path
        self.previous_good = previous_good


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.pt"


def _write_atomically(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step``; keep only the ``keep`` newest."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(directory, step)
    _write_atomically(path, data)
    _write_atomically(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (those with a digest file), oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and p.with_name(p.name + ".sha256").is_file()]
    return sorted(found, key=lambda p: p.name)


def is_intact(path: Path) -> bool:
    digest_file = path.with_name(path.name + ".sha256")
    if not path.is_file() or not digest_file.is_file():
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == digest_file.read_text().strip()


def latest_good(directory: Path, before: Path | None = None) -> Path | None:
    """The newest intact checkpoint (older than ``before`` when given)."""
    for path in reversed(list_checkpoints(directory)):
        if before is not None and path.name >= before.name:
            continue
        if is_intact(path):
            return path
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in ``path``; CorruptCheckpoint (naming the previous good one) if its bytes changed."""
    if not is_intact(path):
        raise CorruptCheckpoint(path, latest_good(path.parent, before=path))
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state
