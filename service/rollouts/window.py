"""What each version served since the analysis loop last looked: requests, server errors and latencies.

The embeddings route records every request it answered (or failed) and the shadow mirror every mirrored
one; ``take`` hands the interval's numbers to the analysis loop and starts a new interval. Each replica
keeps its own; the replicas not holding a rollout's analysis lease hand theirs to the one that does,
through the rollout store (``VersionWindow.to_json`` / ``merged``).
"""

import json
import random
from dataclasses import dataclass, field

import numpy as np

# Latencies kept per version and interval: enough for a stable P95, bounded memory under any load.
MAX_LATENCIES = 4096
# Latencies a replica hands over per interval (a uniform sample of its own).
SHARED_LATENCIES = 512


@dataclass
class VersionWindow:
    requests: int = 0
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def to_json(self) -> str:
        latencies = self.latencies_s
        if len(latencies) > SHARED_LATENCIES:
            latencies = random.sample(latencies, SHARED_LATENCIES)
        return json.dumps({"requests": self.requests, "errors": self.errors, "latencies_s": latencies})

    @classmethod
    def merged(cls, windows: "list[VersionWindow]") -> "VersionWindow":
        """One window of several replicas' (or intervals') measures; at most ``MAX_LATENCIES`` latencies, a
        uniform sample of theirs."""
        latencies = [latency for w in windows for latency in w.latencies_s]
        if len(latencies) > MAX_LATENCIES:
            latencies = random.sample(latencies, MAX_LATENCIES)
        return cls(
            requests=sum(w.requests for w in windows), errors=sum(w.errors for w in windows), latencies_s=latencies
        )

    @classmethod
    def from_json(cls, value: str | bytes) -> "VersionWindow":
        data = json.loads(value)
        return cls(requests=int(data["requests"]), errors=int(data["errors"]), latencies_s=list(data["latencies_s"]))

    @property
    def p95_s(self) -> float | None:
        """P95 latency of successful requests that needed inference (a fast failure or a cache hit must not
        make a version look fast)."""
        return float(np.percentile(self.latencies_s, 95)) if self.latencies_s else None


class CanaryWindow:
    def __init__(self) -> None:
        self._windows: dict[tuple[str, int], VersionWindow] = {}
        self._seen: dict[tuple[str, int], int] = {}
        self._rng = random.Random()

    def record(self, model: str, version: int, seconds: float, failed: bool, computed: bool = True) -> None:
        """One answered request. Latency counts only for requests that needed inference: a new canary's cache
        is cold, and cache hits must not make stable look faster than it computes."""
        key = (model, version)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = VersionWindow()
        window.requests += 1
        if failed:
            window.errors += 1
            return
        if not computed:
            return
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        if len(window.latencies_s) < MAX_LATENCIES:
            window.latencies_s.append(seconds)
        else:  # past the bound, keep a uniform sample of the interval's latencies
            slot = self._rng.randrange(seen)
            if slot < MAX_LATENCIES:
                window.latencies_s[slot] = seconds

    def take(self, model: str, version: int) -> VersionWindow:
        """The interval's numbers of ``model@version``; the next interval starts empty."""
        self._seen.pop((model, version), None)
        return self._windows.pop((model, version), None) or VersionWindow()
