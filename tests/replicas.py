"""Several gateway replicas as real processes, sharing what replicas share in production: one Redis (a
private key prefix on the machine's), one Milvus server process (``loadtests.processes.milvus_server``:
Milvus Lite run as a gRPC server that serialises writes, ``python -m service.vectors.lite_server``, what
``make milvus`` runs), and optionally one Triton."""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from loadtests.processes import gateway
from tests.conftest import SHARED_REDIS_URL


@contextmanager
def gateways(count: int, env: dict[str, str], folder: Path) -> Iterator[list[str]]:
    """``count`` gateway processes with the same ``env`` (EMBEDSERVE_* settings); their base URLs, each ready
    (/readyz 200). Logs in ``folder``/gateway-<i>.log."""
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        urls = [stack.enter_context(gateway(env, folder / f"gateway-{i}.log")) for i in range(count)]
        yield urls


def replica_env(repository: Path, milvus_uri: str, prefix: str, **settings: str) -> dict[str, str]:
    """The settings replicas share (one repository, Milvus and Redis prefix), plus ``settings``
    (EMBEDSERVE_* names)."""
    return {
        "EMBEDSERVE_MODEL_REPOSITORY": str(repository),
        "EMBEDSERVE_MILVUS_URI": milvus_uri,
        "EMBEDSERVE_REDIS_URL": SHARED_REDIS_URL,
        "EMBEDSERVE_REDIS_PREFIX": prefix,
        **settings,
    }
