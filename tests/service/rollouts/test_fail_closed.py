"""Rollouts fail closed: a canary too quiet to be judged is not left taking traffic unjudged, and the
measures of the intervals it waited through add up."""

import asyncio
import itertools
import json
import shutil
import time
from pathlib import Path

import onnx
from onnx import TensorProto, helper
from pydantic import SecretStr

from service.models.manifest import file_sha256
from service.rollouts.state import bucket
from tests.helpers import private_settings, running_gateway

ADMIN = {"Authorization": "Bearer fail-closed-admin"}


def add_failing_version(repository: Path) -> None:
    """tiny@3: a verified version whose graph loads but fails on every input (a Reshape no batch fits), so
    every request it serves is a 5xx from the real backend."""
    version_dir = repository / "tiny" / "3"
    shutil.copytree(repository / "tiny" / "2", version_dir)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 32])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [7919, 7919])
    nodes = [
        helper.make_node("Add", ["input_ids", "attention_mask"], ["summed"]),
        helper.make_node("Cast", ["summed"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["as_float", "shape"], ["embedding"]),
    ]
    graph = helper.make_graph(nodes, "always_fails", [ids, mask], [out], initializer=[shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), version_dir / "model.onnx")
    manifest = json.loads((version_dir / "manifest.json").read_text())
    onnx_file = version_dir / "model.onnx"
    manifest["files"]["model.onnx"] = {"sha256": file_sha256(onnx_file), "size": onnx_file.stat().st_size}
    manifest.update(version=3, source="test: a graph that fails on every input")
    (version_dir / "manifest.json").write_text(json.dumps(manifest))


async def test_a_quiet_canary_failing_every_request_is_rolled_back_within_max_wait_intervals(
    repository_copy: Path,
) -> None:
    add_failing_version(repository_copy)
    settings = private_settings(repository_copy).model_copy(
        update={"admin_api_key": SecretStr("fail-closed-admin"), "stable_versions": {"tiny": 1}}
    )
    async with running_gateway(settings) as (_, client):
        analysis = {
            "enabled": True,
            "interval_s": 0.5,
            "max_wait_intervals": 4,
            "thresholds": {"min_requests": 1000},  # a quiet service never gets there in one interval
        }
        body = {"canary_version": 3, "steps": [5, 100], "analysis": analysis}
        started = await client.put("/v1/rollouts/tiny", json=body, headers=ADMIN)
        assert started.status_code == 200, started.text
        # Callers whose identity falls in the canary's 5 % (and one that doesn't): about 5 canary requests an
        # interval, far from min_requests.
        canary_users = [u for u in (f"user-{i}" for i in range(400)) if bucket("tiny", u) < 500][:10]
        stable_user = next(f"user-{i}" for i in range(400) if bucket("tiny", f"user-{i}") >= 500)
        statuses: dict[str, set[int]] = {}
        deadline = time.monotonic() + 30
        for number in itertools.count():
            state = (await client.get("/v1/rollouts/tiny", headers=ADMIN)).json()
            if state["phase"] != "progressing":
                break
            assert time.monotonic() < deadline, state["last_judgement"]
            user = canary_users[number % len(canary_users)] if number % 2 else stable_user
            answer = await client.post("/v1/embeddings", json={"model": "tiny", "input": "quiet", "user": user})
            statuses.setdefault(answer.headers["x-model-version"], set()).add(answer.status_code)
            await asyncio.sleep(0.05)
        assert all(status >= 500 for status in statuses["3"])  # the canary failed every request it got
        assert statuses["1"] == {200}
        assert (state["phase"], state["weight"], state["stable_version"]) == ("failed", 0, 1)
        decision = state["history"][-1]
        assert decision["action"] == "fail" and "no verdict in 4 intervals" in decision["reason"]
        assert "canary requests < 1000" in decision["reason"]
        # The waited intervals' requests were added up (about 5 an interval), not thrown away each interval.
        assert state["last_judgement"]["canary_requests"] >= 10, state["last_judgement"]
        after = await client.post("/v1/embeddings", json={"model": "tiny", "input": "x", "user": canary_users[0]})
        assert after.status_code == 200 and after.headers["x-model-version"] == "1"
