"""The gateway talks to a real Triton over TLS (Triton's --grpc-use-ssl, a certificate signed by a test CA): it
serves through it with the CA configured, and a plaintext gateway is refused by that Triton."""

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings
from tests.helpers import running_gateway
from tests.triton_server import LocalTriton
from trainer.release.triton_config import write_python_repository


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, and a server certificate it signs for 127.0.0.1 (what the gateway dials)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {name: folder / name for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "san.cnf")}
    names["san.cnf"].write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=embedserve test CA",
        "-keyout",
        str(names["ca.key"]),
        "-out",
        str(names["ca.crt"]),
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(names["server.key"]),
        "-out",
        str(names["server.csr"]),
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(names["server.csr"]),
        "-CA",
        str(names["ca.crt"]),
        "-CAkey",
        str(names["ca.key"]),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(names["san.cnf"]),
        "-out",
        str(names["server.crt"]),
    )
    return names


@pytest.fixture(scope="module")
def tls_triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalTriton, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificates to serve TLS with")
    workdir = tmp_path_factory.mktemp("triton-tls")
    gateway_repository = workdir / "gateway-repository"
    shutil.copytree(model_repository / "tiny", gateway_repository / "tiny")
    write_python_repository(gateway_repository, workdir / "repository")
    certificates = make_certificates(workdir / "certificates")
    tls_args = (
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={certificates['server.crt']}",
        f"--grpc-server-key={certificates['server.key']}",
        f"--grpc-root-cert={certificates['ca.crt']}",
    )
    server = LocalTriton(workdir / "repository", workdir / "triton.log", extra_args=tls_args)
    server.start()
    yield server, certificates["ca.crt"]
    server.stop()


def triton_gateway_settings(triton: LocalTriton, repository: Path, **tls: object) -> Settings:
    return Settings(
        model_repository=repository,
        milvus_uri=str(repository.parent / "milvus.db"),
        backend="triton",
        triton_url=triton.grpc_url,
        cache_enabled=False,
        **tls,
    )


async def test_the_gateway_serves_through_a_triton_that_speaks_tls(tls_triton: tuple[LocalTriton, Path]) -> None:
    triton, ca = tls_triton
    repository = triton.repository.parent / "gateway-repository"
    settings = triton_gateway_settings(triton, repository, triton_tls=True, triton_tls_ca_file=ca)
    async with running_gateway(settings) as (_, client):
        assert (await client.get("/readyz")).status_code == 200
        answer = await client.post("/v1/embeddings", json={"model": "tiny@1", "input": ["over TLS"]})
        assert answer.status_code == 200, answer.text

    # The same Triton, dialled in plaintext: nothing is served, and /readyz says Triton is not reachable.
    async with running_gateway(triton_gateway_settings(triton, repository)) as (_, client):
        assert (await client.get("/readyz")).status_code == 503
        refused = await client.post("/v1/embeddings", json={"model": "tiny@1", "input": ["plaintext"]})
        assert refused.status_code == 503


def test_tls_files_are_checked_when_the_gateway_is_configured(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        Settings(triton_tls=True, triton_tls_cert_file=tmp_path / "client.crt")
    with pytest.raises(ValueError, match="EMBEDSERVE_TRITON_TLS is off"):
        Settings(triton_tls_ca_file=tmp_path / "ca.crt")
    with pytest.raises(ValueError, match="not found"):
        Settings(triton_tls=True, triton_tls_ca_file=tmp_path / "missing.crt")
