"""python -m trainer release — one chain from fresh data to a promoted version, resumable stage by stage.

    snapshot → claim → train → gate → export → serve → canary → collections

``snapshot`` fingerprints the corpus (a resumed release refuses a corpus that changed under it); ``claim`` takes
a place in the gateway's release budget (/v1/admin/releases; refused: exit 3); ``train`` trains within the
training hours the budget has left; ``gate`` compares the trained encoder with the stable version the gateway
serves, as the export gate does with a parent (trainer.release.gate: MRR@10 on ``export.eval_file`` or the
self-supervised dev set, paired bootstrap; a refused gate exports nothing); ``export`` writes the version;
``serve`` has the gateway load it (hot-loading) and waits until it serves it; ``canary`` starts a rollout with
analysis and follows it to promoted (the gateway re-indexes the model's collections before it promotes) or
rolled back; ``collections`` records where the model's collections stand.

Each finished stage is written to ``STATE_DIR/MODEL/RELEASE_ID/state.json`` before the next starts, and
``STATE_DIR/MODEL/current`` names the unfinished release: running the command again after a crash continues
from the first unfinished stage, with the same release id (and so the same place in the budget). A final
outcome (promoted, gate_refused, canary_failed, budget_exhausted, failed, refused) ends the release; the next
run starts a new one. The report (JSON) holds every stage's outcome, timings and details.
"""

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from client.gateway import Gateway, GatewayError
from client.protocol import ENDED_PHASES, ModelVersion, Rollout
from service.models.manifest import GateRecord, ManifestError, read_manifest
from trainer.checkpoint import latest_good
from trainer.config import TrainConfig
from trainer.data.prepare import PreparedCorpus
from trainer.release.export import ExportRefused, model_versions
from trainer.release.gate import candidate_embedder, failed_check, judge, version_embedder
from trainer.release.publish import gate_dev_set, load_trained, publish
from trainer.release.release_state import LEDGER_OUTCOMES, Outcome, ReleaseState, ReleaseStopped, StageRecord
from trainer.run_inputs import load_corpus
from trainer.train import TrainingTimeSpent, train

log = logging.getLogger(__name__)

STAGES = ("snapshot", "claim", "train", "gate", "export", "serve", "canary", "collections")
# The gateway answered, but not now: unreachable (status None) or 502-504 — waited out, never a verdict.
RETRYABLE = (502, 503, 504)


@dataclass
class Release:
    config: TrainConfig
    gateway: Gateway
    folder: Path  # STATE_DIR/MODEL/RELEASE_ID
    state: ReleaseState
    _corpus: PreparedCorpus | None = field(default=None, repr=False)

    @property
    def model(self) -> str:
        return self.config.export.model

    @property
    def run_config(self) -> TrainConfig:
        """The run's config with its files inside the release's folder, under a name unique to the release."""
        return self.config.model_copy(
            update={"run_name": f"{self.config.run_name}-{self.state.release_id}", "output_dir": self.folder / "runs"}
        )

    @property
    def corpus(self) -> PreparedCorpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.run_config)  # prepared where the release's run reads it
        return self._corpus

    def save(self) -> None:
        path = self.folder / "state.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(self.state.model_dump_json(indent=2) + "\n")
        os.replace(temporary, path)

    # -- the chain -----------------------------------------------------------------------------
    def run(self) -> ReleaseState:
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "snapshot": self.snapshot,
            "claim": self.claim,
            "train": self.train,
            "gate": self.gate,
            "export": self.export,
            "serve": self.serve,
            "canary": self.canary,
            "collections": self.collections,
        }
        for name in STAGES:
            done = self.state.stages.get(name)
            if done is not None and done.status == "done":
                continue
            started, clock = datetime.now(UTC), time.perf_counter()
            log.info("release stage", extra={"release_id": self.state.release_id, "stage": name})
            try:
                detail = steps[name]()
            except ReleaseStopped as stop:
                self._record(name, "failed", started, clock, {**stop.detail, "error": str(stop)})
                self.end(stop.outcome, str(stop), stop.checks)
                return self.state
            except Exception as error:
                # A crash, not a verdict: the release stays unfinished and running the command again resumes here.
                self._record(name, "failed", started, clock, {"error": f"{type(error).__name__}: {error}"})
                self.state.error = f"{name}: {type(error).__name__}: {error}"
                self.save()
                raise
            self._record(name, "done", started, clock, detail)
            self._tell_ledger(stage=name, version=detail.get("version"))
        self.end("promoted", None, [])
        return self.state

    def _record(
        self, name: str, status: Literal["done", "failed"], started: datetime, clock: float, detail: dict[str, Any]
    ) -> None:
        seconds = round(time.perf_counter() - clock, 3)
        self.state.stages[name] = StageRecord(status=status, started_at=started, seconds=seconds, detail=detail)
        self.save()

    def end(self, outcome: Outcome, error: str | None, checks: list[str]) -> None:
        """End the release with ``outcome``: saved, and told to the ledger when it had a place there."""
        self.state.outcome, self.state.error, self.state.failed_checks = outcome, error, checks
        self.save()
        if outcome in LEDGER_OUTCOMES and "claim" in self.state.stages and self.state.stages["claim"].status == "done":
            detail = "; ".join(checks) if checks else error
            self.state.ledger_reported = self._tell_ledger(
                stage="report", outcome=outcome, detail=detail[:2000] if detail else None
            )
        self.save()
        log.info("release ended", extra={"release_id": self.state.release_id, "outcome": outcome, "checks": checks})

    def _tell_ledger(self, **fields: Any) -> bool:
        """Report to the gateway's ledger; the release goes on when the gateway cannot be told (it says so)."""
        if "claim" not in self.state.stages or self.state.stages["claim"].status != "done":
            return False
        hours = round(self.state.training_seconds / 3600, 6)
        for attempt in range(3):
            try:
                self.gateway.report_release(self.state.release_id, training_hours=hours, **fields)
                return True
            except GatewayError as error:
                if error.status is not None and error.status not in RETRYABLE:
                    break
                time.sleep(2**attempt)
        log.warning("release ledger not told", extra={"release_id": self.state.release_id, **fields})
        return False

    # -- stages ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        eval_file = self.config.export.eval_file
        if eval_file is not None and not eval_file.is_file():
            raise ReleaseStopped(
                "failed",
                f'export.eval_file ({eval_file}) is not a file: give a labeled JSONL file {{"query", "document"}} '
                "for the gate, or remove the key to gate on the self-supervised dev set (held-out documents).",
            )
        corpus = self.corpus
        return {
            "corpus_fingerprint": corpus.fingerprint,
            "train_texts": len(corpus.train),
            "validation_texts": len(corpus.validation),
        }

    def _check_corpus(self) -> None:
        recorded = self.state.detail("snapshot")["corpus_fingerprint"]
        if self.corpus.fingerprint != recorded:
            raise ReleaseStopped(
                "failed",
                f"the corpus changed since release {self.state.release_id} snapshotted it (fingerprint "
                f"{recorded[:12]}… is now {self.corpus.fingerprint[:12]}…); a release trains and gates on one "
                "snapshot: run again for a new release on the new corpus.",
            )

    def claim(self) -> dict[str, Any]:
        try:
            claim = self.gateway.claim_release(self.model, self.state.trigger, self.state.release_id)
        except GatewayError as error:
            if error.status in (409, 429):
                raise ReleaseStopped("refused", str(error), [error.code or "refused"]) from None
            raise
        return {"training_hours_left": claim.training_hours_left, "resumed": claim.resumed}

    def train(self) -> dict[str, Any]:
        self._check_corpus()
        left_h = self.gateway.claim_release(self.model, self.state.trigger, self.state.release_id).training_hours_left
        if left_h <= 0:
            raise ReleaseStopped("budget_exhausted", "no training hours left in the release budget's window")
        config = self.run_config
        resume = latest_good(config.run_dir / "checkpoints")
        began = time.perf_counter()
        try:
            result = train(config, resume=resume, time_limit_s=left_h * 3600)
        except TrainingTimeSpent as spent:
            raise ReleaseStopped("budget_exhausted", f"{spent} (the release budget's training hours)") from None
        finally:
            self.state.training_seconds += time.perf_counter() - began
            self.save()
        return {
            "steps": result.steps,
            "final_loss": result.final_loss,
            "checkpoint": str(result.last_checkpoint),
            "training_hours": round(self.state.training_seconds / 3600, 6),
            "resumed_from": str(resume) if resume else None,
        }

    def gate(self) -> dict[str, Any]:
        """The export gate (trainer.release.gate) against the stable version the gateway serves: what the canary
        would replace. Its verdict is what the export stage records."""
        checkpoint = Path(self.state.detail("train")["checkpoint"])
        config = self.config
        stable_version = self.gateway.release_signals(self.model).stable_version
        trained = load_trained(checkpoint)
        if stable_version is None:
            gate = GateRecord(decision="not_gated")
        else:
            stable = version_embedder(config.export.repository / self.model / str(stable_version))
            with candidate_embedder(trained.encoder, trained.tokenizer_dir) as candidate:
                gate = judge(
                    candidate,
                    stable,
                    f"{self.model}@{stable_version}",
                    gate_dev_set(config, self.corpus.validation),
                    config.export.gate,
                    config.release.gate.min_delta,
                )
        detail: dict[str, Any] = {"stable_version": stable_version, "gate": gate.model_dump(mode="json")}
        if gate.decision == "refused":
            raise ReleaseStopped(
                "gate_refused",
                f"gate against stable: {failed_check(gate)}; nothing was exported (train longer or with a lower "
                "learning rate; release.gate.min_delta < 0 tolerates a loss)",
                [failed_check(gate)],
                detail,
            )
        return detail

    def export(self) -> dict[str, Any]:
        checkpoint = Path(self.state.detail("train")["checkpoint"])
        written = self._exported(checkpoint)
        if written is None:
            gate = GateRecord.model_validate(self.state.detail("gate")["gate"])
            try:
                written = publish(checkpoint, gate=gate)
            except ExportRefused as refused:  # ONNX parity: the gate's verdict is not asked again
                raise ReleaseStopped("failed", str(refused), ["export refused"]) from None
        manifest = read_manifest(written)
        return {"version": manifest.version, "sha256": manifest.sha256, "path": str(written)}

    def _exported(self, checkpoint: Path) -> Path | None:
        """The version this checkpoint was exported as by an earlier try of this release (crashed after it)."""
        repository, source = self.config.export.repository, self._source(checkpoint)
        for version in model_versions(repository, self.model):
            try:
                if read_manifest(repository / self.model / str(version)).source == source:
                    return repository / self.model / str(version)
            except ManifestError:
                continue
        return None

    def _source(self, checkpoint: Path) -> str:
        """What publish() writes as the manifest's source: the checkpoint's run (this release's run_config)."""
        return f"trainer run {self.run_config.run_name} checkpoint {checkpoint.name}"

    def serve(self) -> dict[str, Any]:
        version = int(self.state.detail("export")["version"])
        began = time.monotonic()
        deadline = began + self.config.release.serve_timeout_s
        self._retrying(self.gateway.reload_models)
        while True:
            card = self._retrying(lambda: self._version_card(version))
            if card is not None and card.state == "ready":
                return {"version": version, "seconds_to_serve": round(time.monotonic() - began, 3)}
            if card is not None and card.state == "refused":
                raise ReleaseStopped(
                    "failed", f"the gateway refused {self.model}@{version}: {card.reason}", ["version refused"]
                )
            if time.monotonic() > deadline:
                raise ReleaseStopped(
                    "failed",
                    f"the gateway did not serve {self.model}@{version} within {self.config.release.serve_timeout_s:g} "
                    f"s (last seen: {card.state if card else 'not listed'}); does it read the repository the "
                    "release exports to?",
                )
            time.sleep(self.config.release.poll_s)
            self._retrying(self.gateway.reload_models)

    def canary(self) -> dict[str, Any]:
        version = int(self.state.detail("export")["version"])
        canary = self.config.release.canary
        rollout = self._retrying(lambda: self.gateway.rollout(self.model))
        if rollout is None or rollout.canary_version != version:
            rollout = self._start_rollout(version)
        judgements: dict[datetime, dict[str, Any]] = {}
        deadline = time.monotonic() + canary.timeout_s
        while rollout.phase not in ENDED_PHASES:
            if time.monotonic() > deadline:
                reason = f"release {self.state.release_id}: canary undecided after {canary.timeout_s:g} s"
                rollout = self.gateway.rollback(self.model, reason)
                break
            time.sleep(self.config.release.poll_s)
            rollout = self._retrying(lambda: self.gateway.rollout(self.model)) or rollout
            judgement = rollout.last_judgement
            if judgement is not None:
                judgements[judgement.at] = judgement.model_dump(mode="json")
        detail = {
            "version": version,
            "phase": rollout.phase,
            "weight": rollout.weight,
            "decisions": [decision.model_dump(mode="json") for decision in rollout.history],
            "judgements": list(judgements.values()),
        }
        if rollout.phase != "promoted":
            checks = [decision.reason for decision in rollout.history[-1:]]
            last = rollout.last_judgement
            if last is not None and last.result == "fail" and last.reason not in checks:
                checks.insert(0, last.reason)
            message = f"the canary was {rollout.phase}; stable keeps serving"
            raise ReleaseStopped("canary_failed", message, checks, detail)
        return detail

    def _version_card(self, version: int) -> ModelVersion | None:
        """What GET /v1/models says of the model's ``version`` (ready, refused or not loaded); None if not listed."""
        model = next((m for m in self.gateway.models() if m.id == self.model), None)
        return model.version(version) if model is not None else None

    def _start_rollout(self, version: int) -> Rollout:
        """Start the canary; behind a load balancer the replica that answers may not serve the version yet (it
        loads it at its next rescan): its 400 is retried, with a reload, until the serve timeout."""
        canary = self.config.release.canary
        deadline = time.monotonic() + self.config.release.serve_timeout_s
        while True:
            try:
                return self.gateway.start_rollout(
                    self.model,
                    version,
                    steps=canary.steps,
                    analysis={**canary.analysis, "enabled": True},
                    shadow_percent=canary.shadow_percent,
                    reason=f"release {self.state.release_id} ({self.state.trigger})",
                )
            except GatewayError as error:
                if error.status != 400 or "cannot" not in str(error) or time.monotonic() > deadline:
                    raise
            time.sleep(self.config.release.poll_s)
            self._retrying(self.gateway.reload_models)

    def collections(self) -> dict[str, Any]:
        version = int(self.state.detail("export")["version"])
        mine = [c for c in self._retrying(self.gateway.collections) if c.model == self.model]
        return {
            "version": version,
            "collections": {c.name: {"version": c.version, "state": c.state} for c in mine},
            "not_moved": [c.name for c in mine if c.version != version],
        }

    def _retrying(self, call: Callable[[], Any]) -> Any:
        """``call``, tried again for a minute while the gateway is unreachable or answers 502-504."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return call()
            except GatewayError as error:
                if (error.status is not None and error.status not in RETRYABLE) or time.monotonic() > deadline:
                    raise
                time.sleep(self.config.release.poll_s)
