"""Checkpoints written atomically with their sha256, at most K kept, verified before loading.

Layout of the checkpoint of step 100 in ``<dir>``:

- ``step-00000100.safetensors``: the weights (the ``encoder`` and ``mlm_head`` state dicts, keys
  prefixed ``encoder.`` / ``mlm_head.``) in safetensors, which holds tensors and nothing executable;
- ``step-00000100.pt``: everything else (optimiser, scheduler, every RNG, data position, config), a
  ``torch.save`` read back with ``weights_only=True``, which refuses any pickled object but tensors and
  plain containers;
- ``step-00000100.pt.sha256``: ``sha256sum`` lines for both files, written last.

Each file is written to a temporary file, fsynced and renamed into place; the digest file comes last,
so a checkpoint without one is one whose write did not finish and is ignored. The ``.pt`` path names
the checkpoint everywhere (``--resume``, listings).

Checkpoints of the earlier format (one pickle read with ``weights_only=False``, a bare digest) are
refused with OldCheckpointFormat: loading them would run arbitrary pickled code.
"""

import hashlib
import io
import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})\.pt$")
WEIGHTS = ("encoder", "mlm_head")  # the state's module state dicts, stored as safetensors


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


class OldCheckpointFormat(ValueError):
    """A checkpoint written before weights moved to safetensors: a pickle that only loads by running its code."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"checkpoint {path} is in the old single-pickle format, which can only be read with "
            "torch.load(weights_only=False) (running whatever code it holds); it is refused. "
            "Start the run again, or export it with the trainer version that wrote it."
        )


class UnsafeCheckpoint(ValueError):
    """A checkpoint whose payload holds something other than tensors and plain data (refused by weights_only)."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.pt"


def weights_path(path: Path) -> Path:
    """The safetensors file holding the weights of the checkpoint named ``path``."""
    return path.with_suffix(".safetensors")


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


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


def _weights_bytes(state: dict[str, Any]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for part in WEIGHTS:
        for name, tensor in (state.get(part) or {}).items():
            # safetensors refuses tensors sharing memory (the MLM decoder is tied to the word embeddings).
            shared = tensor.untyped_storage().data_ptr() in seen
            seen.add(tensor.untyped_storage().data_ptr())
            tensors[f"{part}.{name}"] = (tensor.clone() if shared else tensor).detach().cpu().contiguous()
    return save_safetensors(tensors)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step``; keep only the ``keep`` newest.

    ``state`` holds tensors, numbers, strings, None and lists/tuples/dicts of them; its ``encoder`` and
    ``mlm_head`` entries (module state dicts, when present) go to the safetensors file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    weights = _weights_bytes(state)
    buffer = io.BytesIO()
    torch.save({key: value for key, value in state.items() if key not in WEIGHTS}, buffer)
    rest = buffer.getvalue()
    _write_atomically(weights_path(path), weights)
    _write_atomically(path, rest)
    digests = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n"
        for data, name in ((weights, weights_path(path).name), (rest, path.name))
    )
    _write_atomically(_digest_path(path), digests.encode())
    for old in list_checkpoints(directory)[:-keep]:
        for file in (old, weights_path(old), _digest_path(old)):
            file.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (those with a digest file), oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and _digest_path(p).is_file()]
    return sorted(found, key=lambda p: p.name)


def _recorded_digests(path: Path) -> dict[str, str] | None:
    """File name -> sha256 from the digest file; None for a bare digest (the old single-pickle format)."""
    lines = _digest_path(path).read_text().splitlines()
    recorded = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        if name:
            recorded[name] = digest
    return recorded or None


def is_old_format(path: Path) -> bool:
    digest_file = _digest_path(path)
    return digest_file.is_file() and _recorded_digests(path) is None


def is_intact(path: Path) -> bool:
    """Both files of the checkpoint exist and match their recorded sha256 (False for the old format)."""
    if not path.is_file() or not _digest_path(path).is_file():
        return False
    recorded = _recorded_digests(path)
    if recorded is None:
        return False
    for file in (path, weights_path(path)):
        if not file.is_file() or recorded.get(file.name) != hashlib.sha256(file.read_bytes()).hexdigest():
            return False
    return True


def latest_good(directory: Path, before: Path | None = None) -> Path | None:
    """The newest intact checkpoint (older than ``before`` when given)."""
    for path in reversed(list_checkpoints(directory)):
        if before is not None and path.name >= before.name:
            continue
        if is_intact(path):
            return path
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in ``path``, weights included; CorruptCheckpoint (naming the previous good one) if its
    bytes changed, OldCheckpointFormat for a single-pickle checkpoint, UnsafeCheckpoint if its payload holds
    anything but tensors and plain data."""
    if is_old_format(path):
        raise OldCheckpointFormat(path)
    if not is_intact(path):
        raise CorruptCheckpoint(path, latest_good(path.parent, before=path))
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as refused:
        raise UnsafeCheckpoint(
            f"checkpoint {path} holds objects other than tensors and plain data; refused ({refused})"
        ) from refused
    weights = load_safetensors(weights_path(path).read_bytes())
    for part in WEIGHTS:
        prefix = f"{part}."
        found = {name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
        state[part] = found or None
    return state
