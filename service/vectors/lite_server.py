"""Milvus Lite as one server that several processes share: ``python -m service.vectors.lite_server --data-dir
data/milvus-server`` (``make milvus``), reached at ``EMBEDSERVE_MILVUS_URI=http://127.0.0.1:19530``.

milvus_lite ships a pure-Python gRPC server (``python -m milvus_lite server``) whose engine is single-writer per
collection, while the server runs every call on a thread of its pool: two clients writing one collection at once
(or one writing while another flushes it) race on its sequence numbers and memtable — "current_seq is
monotonic" flush failures with a few concurrent writers (tests/service/vectors/test_lite_server.py). A gateway
serialises its own writes, but several gateways cannot serialise each other's. This is the same server with
every call that changes state run one at a time; reads (search, query, describe, list) still run side by side,
as they do beside a writer in a gateway's in-process Milvus Lite. Its server info says so
(``milvus.SERIALISED_LITE``), which is how a gateway tells it from the unserialised one.
"""

import argparse
import functools
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from milvus_lite.adapter.grpc.servicer import MilvusServicer
from milvus_lite.db import MilvusLite
from pymilvus.grpc_gen import common_pb2, milvus_pb2_grpc

from service.telemetry.logs import configure_logging
from service.vectors.milvus import LITE_BUILD_TAG, SERIALISED_LITE

log = logging.getLogger("service.vectors.lite_server")  # not "__main__" when run with -m

# Calls that only read: they run concurrently. Every other call (writes, flushes, loads, indexes, DDL, aliases,
# and any call this list does not know) holds the server's write lock.
READS = frozenset(
    {
        "Connect",
        "GetVersion",
        "CheckHealth",
        "HasCollection",
        "DescribeCollection",
        "ShowCollections",
        "Query",
        "Search",
        "HybridSearch",
        "DescribeIndex",
        "GetIndexState",
        "GetIndexBuildProgress",
        "GetLoadingProgress",
        "GetLoadState",
        "HasPartition",
        "ShowPartitions",
        "GetFlushState",
        "GetCollectionStatistics",
        "GetPartitionStatistics",
        "ListDatabases",
        "DescribeDatabase",
        "DescribeAlias",
        "ListAliases",
        "GetCompactionState",
    }
)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # as milvus_lite's own server and Milvus standalone
WORKERS = 10
STOP_GRACE_S = 5.0


class SharedLite(MilvusLite):  # type: ignore[misc]  # milvus_lite has no types
    """Milvus Lite whose collections are opened one at a time: a read that opens a collection (the first call
    after a start) must not open it twice beside another read, nor beside a drop or rename."""

    def __init__(self, data_dir: str) -> None:
        super().__init__(data_dir)
        self._opening = threading.RLock()

    def get_collection(self, *args: Any, **kwargs: Any) -> Any:
        with self._opening:
            return super().get_collection(*args, **kwargs)

    def drop_collection(self, *args: Any, **kwargs: Any) -> None:
        with self._opening:
            super().drop_collection(*args, **kwargs)

    def rename_collection(self, *args: Any, **kwargs: Any) -> None:
        with self._opening:
            super().rename_collection(*args, **kwargs)


class SerialisedServicer(MilvusServicer):  # type: ignore[misc]
    """milvus_lite's servicer; the calls not in ``READS`` run one at a time (see ``serialised``)."""

    def __init__(self, db: MilvusLite) -> None:
        super().__init__(db)
        self.writing = threading.Lock()

    def Connect(self, request: Any, context: Any) -> Any:
        response = super().Connect(request, context)
        response.server_info.CopyFrom(common_pb2.ServerInfo(build_tags=LITE_BUILD_TAG, deploy_mode=SERIALISED_LITE))
        return response


def _serialised(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: SerialisedServicer, request: Any, context: Any) -> Any:
        with self.writing:
            return method(self, request, context)

    return call


# Every call of the Milvus service that is not a read, including the ones milvus_lite answers UNIMPLEMENTED.
for _name in dir(milvus_pb2_grpc.MilvusServiceServicer):
    if _name[0].isupper() and _name not in READS:
        setattr(SerialisedServicer, _name, _serialised(getattr(MilvusServicer, _name)))


def start(data_dir: Path, host: str, port: int) -> tuple[grpc.Server, MilvusLite, int]:
    """The server listening on host:port (0 = a free port); (server, database, port). Holds the data folder's lock
    (a second server on it fails) until the database is closed."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = SharedLite(str(data_dir))
    server = grpc.server(
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="milvus-lite"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    milvus_pb2_grpc.add_MilvusServiceServicer_to_server(SerialisedServicer(db), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, db, bound


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.vectors.lite_server",
        description="Milvus Lite as a server several gateways share (writes serialised).",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="folder of the data (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=19530, help="port to listen on (default 19530)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    configure_logging(args.log_level)
    stopping = threading.Event()

    def stop(sig: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server, db, port = start(args.data_dir, args.host, args.port)
    log.info("milvus lite server listening", extra={"address": f"{args.host}:{port}", "data_dir": str(args.data_dir)})
    stopping.wait()
    # In-flight calls finish, then the database flushes and frees the data folder.
    server.stop(STOP_GRACE_S).wait()
    db.close()
    log.info("milvus lite server stopped")


if __name__ == "__main__":
    main()
