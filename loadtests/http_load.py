"""A minimal closed-loop HTTP/1.1 load generator on raw asyncio streams.

The benchmark machine has 2 cores shared by the server under test and this client, so the client
must cost as little CPU as possible: keep-alive connections, pre-encoded requests, no HTTP library.
"""

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    elapsed_s: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict[str, float]:
        """Throughput, latency percentiles and counts, rounded for a report."""
        return {
            "per_s": round(self.per_s, 1),
            "p50_ms": round(self.percentile_ms(50), 2),
            "p95_ms": round(self.percentile_ms(95), 2),
            "p99_ms": round(self.percentile_ms(99), 2),
            "requests": self.requests,
            "errors": self.errors,
        }


def _request_bytes(host: str, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def run_load(
    url: str, path: str, bodies: list[bytes], concurrency: int, duration_s: float, warmup_s: float = 1.0
) -> LoadResult:
    """``concurrency`` clients, each sending the next body as soon as its previous answer arrived.

    Requests that finish during the first ``warmup_s`` are not counted."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [_request_bytes(host, path, body) for body in bodies]
    result = LoadResult(concurrency=concurrency, elapsed_s=0.0)
    counter = 0
    started = time.perf_counter()
    measure_from = started + warmup_s
    stop_at = measure_from + duration_s

    async def client() -> None:
        nonlocal counter
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < stop_at:
                request = requests[counter % len(requests)]
                counter += 1
                sent = time.perf_counter()
                writer.write(request)
                status = await _read_response(reader)
                done = time.perf_counter()
                if done < measure_from or done > stop_at:
                    continue
                result.status_counts[status] = result.status_counts.get(status, 0) + 1
                if status == 200:
                    result.latencies_ms.append((done - sent) * 1000)
                else:
                    result.errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed_s = min(time.perf_counter(), stop_at) - measure_from
    return result
