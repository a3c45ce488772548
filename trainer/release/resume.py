"""Which release a run of `python -m trainer release` drives: the model's unfinished one (resumed), or a new one."""

import fcntl
import hashlib
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from client.gateway import Gateway
from trainer.config import TrainConfig
from trainer.release.chain import Release
from trainer.release.release_state import ReleaseState

log = logging.getLogger(__name__)


class ReleaseBusy(Exception):
    """Another release command of the model runs on the same state directory (the schedule and the watch job)."""


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One release command per model and state directory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReleaseBusy(f"another release command holds {folder / '.lock'}; let it finish first") from None
        yield


def release(
    config: TrainConfig,
    config_text: str,
    gateway: Gateway,
    state_dir: Path,
    trigger: str,
    restart: bool = False,
) -> ReleaseState:
    """Run the model's unfinished release to its end, or start a new one (``trigger`` auto: only when the
    gateway says staleness or drift makes one due)."""
    model = config.export.model
    model_dir = state_dir / model
    with locked(model_dir):
        sha = hashlib.sha256(config_text.encode()).hexdigest()
        current = model_dir / "current"
        state = None
        if current.is_file():
            folder = model_dir / current.read_text().strip()
            state = ReleaseState.model_validate_json((folder / "state.json").read_text())
            if restart:
                Release(config, gateway, folder, state).end("failed", "abandoned (--restart)", ["abandoned"])
                state = None
            elif state.config_sha256 != sha:
                raise ValueError(
                    f"the run config changed since release {state.release_id} started; restore it to resume, "
                    "or run with --restart to abandon that release and start a new one"
                )
        if state is None:
            if trigger == "auto":
                due = gateway.release_signals(model).due
                if not due:
                    return ReleaseState(
                        release_id="-",
                        model=model,
                        trigger="auto",
                        config_sha256=sha,
                        started_at=datetime.now(UTC),
                        outcome="not_due",
                    )
                trigger = due[0]
            release_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
            folder = model_dir / release_id
            folder.mkdir(parents=True)
            state = ReleaseState(
                release_id=release_id, model=model, trigger=trigger, config_sha256=sha, started_at=datetime.now(UTC)
            )
            (folder / "state.json").write_text(state.model_dump_json(indent=2) + "\n")
            current.write_text(release_id)
        else:
            log.info("resuming release", extra={"release_id": state.release_id, "done": list(state.stages)})
        ended = Release(config, gateway, folder, state).run()
        if ended.outcome is not None:
            current.unlink(missing_ok=True)
        return ended
