"""`embedserve` against a real gateway process: a 5,000-item upsert from a file with its progress bar, every item
found afterwards; re-index watching; rollout status and steering; `embedserve serve`; mistakes and refusals said
on standard error with exit codes 2 and 1."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from client.async_gateway import AsyncGateway
from client.cli import main
from client.gateway import Gateway
from loadtests.processes import free_port
from tests.client.conftest import ADMIN_KEY, READER_KEY, WRITER_KEY, RunningGateway
from trainer.data.sample_text import sentences

ROOT = Path(__file__).resolve().parents[2]
BULK = 2500


def embedserve(url: str, *args: str, key: str | None = WRITER_KEY) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: its own process, its own environment."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("EMBEDSERVE_")}
    if key is not None:
        env["EMBEDSERVE_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "client.cli", "--url", url, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def term(index: int) -> str:
    return f"code{index:05d}"  # a keyword term that only item ``index`` has


def write_items(path: Path, count: int) -> list[dict[str, object]]:
    pool = sentences()
    items: list[dict[str, object]] = [
        {"id": f"item-{i}", "text": f"{' '.join(pool[i % len(pool)].split()[:12])} {term(i)}", "metadata": {"n": i}}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return items


def test_a_bulk_upsert_shows_progress_and_every_item_is_then_found(
    keyed_gateway: RunningGateway, tmp_path: Path
) -> None:
    url = keyed_gateway.url
    created = embedserve(url, "collections", "create", "bulk", "--model", "tiny@1", "--field", "n:int")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("bulk: tiny@1, 0 items, ready")
    items = write_items(tmp_path / "items.jsonl", BULK)

    upserted = embedserve(url, "collections", "upsert", "bulk", str(tmp_path / "items.jsonl"), "--progress")

    assert upserted.returncode == 0, upserted.stderr
    # tqdm's bar, redrawn as batches land, ends full.
    assert "upsert bulk" in upserted.stderr and f"{BULK}/{BULK}" in upserted.stderr, upserted.stderr
    assert f"1000/{BULK}" in upserted.stderr  # drawn after the first batch too, not only at the end
    assert f"upserted {BULK} items into bulk (tiny@1)" in upserted.stdout and f"holds {BULK} items" in upserted.stdout

    async def stored() -> list[object]:
        async with AsyncGateway(url, WRITER_KEY) as gateway:
            gate = asyncio.Semaphore(8)

            async def one(item_id: str) -> object:
                async with gate:
                    return (await gateway.get_item("bulk", item_id)).model_dump()

            return list(await asyncio.gather(*(one(str(item["id"])) for item in items)))

    assert asyncio.run(stored()) == items
    with Gateway(url, READER_KEY) as gateway:
        for i in range(0, BULK, 97):
            hits = gateway.search("bulk", term(i), mode="keyword", top_k=1, output_fields=[]).hits
            assert [hit.id for hit in hits] == [f"item-{i}"]
        assert gateway.collection("bulk").items == BULK
    # Without --progress, and not on a terminal: no bar.
    again = embedserve(url, "collections", "upsert", "bulk", str(tmp_path / "items.jsonl"), "--batch-size", "500")
    assert again.returncode == 0 and "upsert bulk" not in again.stderr, again.stderr
    found = embedserve(url, "collections", "search", "bulk", term(42), "--mode", "keyword", "--top-k", "3", key=None)
    assert found.returncode == 1 and "401 missing API key" in found.stderr and "EMBEDSERVE_API_KEY" in found.stderr
    found = embedserve(url, "collections", "search", "bulk", term(42), "--mode", "keyword", "--top-k", "3")
    assert found.returncode == 0, found.stderr
    # Only item 42 holds the term.
    assert found.stdout.splitlines()[0] == "1 hit from tiny@1, best first:"
    assert found.stdout.splitlines()[1].split()[1:3] == ["item-42", "The"]


def test_reindex_is_watched_with_a_progress_bar_to_its_end(
    keyed_gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDSERVE_API_KEY", WRITER_KEY)
    url = keyed_gateway.url
    assert main(["--url", url, "collections", "create", "moving", "--model", "tiny@1", "--field", "n:int"]) == 0
    write_items(tmp_path / "items.jsonl", 300)
    assert main(["--url", url, "collections", "upsert", "moving", str(tmp_path / "items.jsonl")]) == 0
    capsys.readouterr()

    assert main(["--url", url, "collections", "reindex", "moving", "--version", "2", "--wait", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert "reindex moving to tiny@2" in err and "300/300" in err, err
    assert out.startswith("moving: tiny@2, 300 items, ready"), out
    assert main(["--url", url, "collections", "status", "moving", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["version"], status["items"], status["state"], status["reindex"]) == (2, 300, "ready", None)
    # Without --version: the model's default version (tiny@1 here), and back it goes.
    assert main(["--url", url, "collections", "reindex", "moving", "--wait"]) == 0
    assert capsys.readouterr().out.startswith("moving: tiny@1, 300 items, ready")
    assert main(["--url", url, "collections", "reindex", "moving", "--version", "1"]) == 1
    assert "409 collection 'moving' is already on tiny@1" in capsys.readouterr().err
    assert main(["--url", url, "collections", "delete", "moving"]) == 0
    assert main(["--url", url, "collections", "status", "moving"]) == 1
    assert "404 collection 'moving' does not exist" in capsys.readouterr().err


def test_rollout_status_prints_the_rollout_and_the_commands_steer_it(
    keyed_gateway: RunningGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDSERVE_ADMIN_API_KEY", ADMIN_KEY)
    url = keyed_gateway.url

    def rollout(*args: str) -> tuple[int, str, str]:
        code = main(["--url", url, "rollout", *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = rollout("status", "minilm")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "minilm: promoted - stable 1, no canary; analysis off; revision 1"
    assert lines[1] == "  history:" and "gateway" in lines[2] and "adopt" in lines[2]
    assert "minilm@1 is the stable version: the highest version verified" in lines[2]

    code, out, err = rollout("start", "tiny", "2", "--steps", "10,50", "--reason", "try tiny 2")
    assert code == 0, err
    assert out.startswith("tiny: progressing - stable 1, canary 2 at 10% (steps 10,50); analysis off; revision 2")
    assert "start" in out and "0% ->  10%  try tiny 2" in out
    assert rollout("weight", "tiny", "50")[0] == 0
    assert rollout("pause", "tiny", "--reason", "look at it")[0] == 0
    code, out, _ = rollout("show", "tiny", "--json")
    shown = json.loads(out)
    assert (shown["phase"], shown["weight"], shown["history"][-1]["reason"]) == ("paused", 50, "look at it")
    code, out, err = rollout("resume", "tiny", "--revision", "1")  # a stale revision
    assert code == 1 and "409 rollout is at revision 4, not 1; re-read it and retry." in err
    assert rollout("resume", "tiny", "--revision", "4")[0] == 0
    code, out, _ = rollout("rollback", "tiny", "--reason", "enough")
    assert out.startswith("tiny: rolled back - stable 1, canary 2 at 0%")
    code, out, _ = rollout("list")
    assert code == 0 and sorted(line.split(":")[0] for line in out.splitlines()) == ["minilm", "tiny"]
    code, _, err = rollout("promote", "tiny")
    assert code == 1 and "409 cannot promote tiny: its rollout is rolled_back" in err
    code, _, err = rollout("status", "nosuch")
    assert code == 1 and "nosuch has no rollout" in err

    monkeypatch.setenv("EMBEDSERVE_ADMIN_API_KEY", WRITER_KEY)  # a key without the admin scope
    code, _, err = rollout("list")
    assert code == 1 and "403" in err and "EMBEDSERVE_ADMIN_API_KEY" in err


@pytest.mark.parametrize(
    ("content", "args", "says"),
    [
        ('{"id": "a", "text": "x"}\n{"id": 1, "text": "y"}\n', [], "items.jsonl:2: expected"),
        ("not json\n", [], "items.jsonl:1: not JSON"),
        ('{"id": "a", "text": "x", "vector": []}\n', [], "items.jsonl:1: expected"),
        ('{"id": "a", "text": "x"}\n', ["--batch-size", "1001"], "--batch-size must be between 1 and 1000"),
    ],
)
def test_mistakes_are_said_before_anything_is_sent(
    content: str, args: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text(content)
    # Port 9 answers nothing: a mistake found first never gets as far as the gateway.
    assert main(["--url", "http://127.0.0.1:9", "collections", "upsert", "c", str(path), *args]) == 2
    assert says in capsys.readouterr().err


def test_usage_errors_and_an_unreachable_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBEDSERVE_ADMIN_API_KEY", raising=False)
    monkeypatch.delenv("EMBEDSERVE_API_KEY", raising=False)
    assert main(["--url", "http://127.0.0.1:9", "rollout", "list"]) == 2
    assert "set EMBEDSERVE_ADMIN_API_KEY" in capsys.readouterr().err
    assert main(["--url", "http://127.0.0.1:9", "collections", "create", "c", "--model", "m", "--field", "x:y"]) == 2
    assert "expected NAME:TYPE with TYPE one of string, int" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["collections", "upsert"])
    assert usage.value.code == 2
    assert main(["--url", "http://127.0.0.1:9", "collections", "list"]) == 1
    assert "cannot reach the gateway at http://127.0.0.1:9" in capsys.readouterr().err


def test_serve_runs_the_gateway(model_repository: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "EMBEDSERVE_MODEL_REPOSITORY": str(model_repository),
        "EMBEDSERVE_MILVUS_URI": str(tmp_path / "milvus.db"),
        "EMBEDSERVE_PORT": "1",  # --port wins
    }
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 90
        while not ready(f"http://127.0.0.1:{port}"):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.2)
        with Gateway(f"http://127.0.0.1:{port}") as gateway:
            assert {model.id for model in gateway.models()} == {"minilm", "tiny"}
        # The command became the gateway: the same process, so a supervisor's signals reach the gateway itself.
        assert Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-m", b"service", b"serve"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
