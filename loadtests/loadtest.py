"""Run loadtests/locustfile.py headless against a gateway for a bounded time, then judge it against SLOs.

    python -m loadtests.loadtest --url http://127.0.0.1:8000 --duration 60 --users 16   (or: make loadtest)

Writes to ``--out`` (default loadtests/results/): ``loadtest.html`` (Locust's report, requests named by
model version), ``loadtest-latency.png`` (P50/P95 over time per request group, one line per model
version) and ``loadtest.json`` (per group and version: count, errors, percentiles; the verdict).
Exit status: 0 every SLO met, 1 an SLO breached, 2 the run itself failed (Locust did not finish within
its bound, the gateway could not be reached, or no request was made).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DEFAULT_SLO = Path(__file__).with_name("slo.yaml")
DEFAULT_OUT = Path(__file__).with_name("results")
ALL_VERSIONS = "all"
EXIT_BREACH = 1
EXIT_RUN_FAILED = 2


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")

    p95_ms: float = Field(gt=0, description="Most P95 response time, in milliseconds.")
    max_error_rate: float = Field(ge=0, le=1, description="Most failed / all requests.")


class SloConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slos: dict[str, Objective] = Field(min_length=1, description="Request-group prefix -> its objective.")
    min_requests: int = Field(20, ge=1, description="Fewest requests for a version to be judged on its own.")

    @classmethod
    def load(cls, path: Path) -> "SloConfig":
        return cls.model_validate(yaml.safe_load(path.read_text()))


@dataclass
class Sample:
    t: float
    group: str
    version: str
    ms: float
    ok: bool
    status: int


@dataclass
class Stats:
    requests: int
    errors: int
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    per_s: float


@dataclass
class Judgement:
    slo: str
    version: str
    requests: int
    p95_ms: float
    p95_limit_ms: float
    error_rate: float
    error_rate_limit: float

    @property
    def met(self) -> bool:
        return self.p95_ms <= self.p95_limit_ms and self.error_rate <= self.error_rate_limit


def read_samples(path: Path) -> list[Sample]:
    if not path.exists():
        return []
    return [Sample(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def stats(samples: list[Sample], elapsed_s: float) -> Stats:
    latencies = np.array([s.ms for s in samples])
    errors = sum(not s.ok for s in samples)
    p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99))
    return Stats(
        requests=len(samples),
        errors=errors,
        error_rate=round(errors / len(samples), 5),
        p50_ms=round(p50, 2),
        p95_ms=round(p95, 2),
        p99_ms=round(p99, 2),
        per_s=round(len(samples) / elapsed_s, 2) if elapsed_s > 0 else 0.0,
    )


def by_version(samples: list[Sample]) -> dict[str, list[Sample]]:
    versions: dict[str, list[Sample]] = {}
    for sample in samples:
        versions.setdefault(sample.version, []).append(sample)
    return dict(sorted(versions.items()))


def judge(samples: list[Sample], config: SloConfig) -> list[Judgement]:
    """Each objective over all versions together, and over each version with at least min_requests."""
    judgements = []
    for prefix, objective in config.slos.items():
        matched = [s for s in samples if s.group.startswith(prefix)]
        if not matched:
            continue
        scopes = {ALL_VERSIONS: matched}
        scopes.update({v: vs for v, vs in by_version(matched).items() if len(vs) >= config.min_requests})
        for version, scoped in scopes.items():
            summary = stats(scoped, 0)
            judgements.append(
                Judgement(
                    slo=prefix,
                    version=version,
                    requests=summary.requests,
                    p95_ms=summary.p95_ms,
                    p95_limit_ms=objective.p95_ms,
                    error_rate=summary.error_rate,
                    error_rate_limit=objective.max_error_rate,
                )
            )
    return judgements


def plot(samples: list[Sample], config: SloConfig, path: Path) -> None:
    """P50 (thin) and P95 (thick) per second, one subplot per request group, one colour per model version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = min(s.t for s in samples)
    groups = sorted({s.group for s in samples})
    versions = sorted({s.version for s in samples})
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(versions)}
    figure, axes = plt.subplots(len(groups) + 1, 1, figsize=(11, 3.2 * (len(groups) + 1)), sharex=True, squeeze=False)
    for axis, group in zip(axes[:-1, 0], groups, strict=True):
        for version, scoped in by_version([s for s in samples if s.group == group]).items():
            seconds = np.array([int(s.t - start) for s in scoped])
            latencies = np.array([s.ms for s in scoped])
            xs = np.unique(seconds)
            for q, width in ((50, 0.8), (95, 2.0)):
                ys = [np.percentile(latencies[seconds == x], q) for x in xs]
                label = f"v{version} P{q}"
                axis.plot(xs, ys, color=colours[version], linewidth=width, label=label)
            failed = [s for s in scoped if not s.ok]
            if failed:
                axis.scatter(
                    [s.t - start for s in failed], [s.ms for s in failed], color=colours[version], marker="x", s=12
                )
        for prefix, objective in config.slos.items():
            if group.startswith(prefix):
                axis.axhline(objective.p95_ms, color="red", linestyle="--", linewidth=1, label=f"SLO P95 {prefix}")
        axis.set_title(group)
        axis.set_ylabel("ms")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="upper left", ncol=4)
    throughput = axes[-1, 0]
    for version, scoped in by_version(samples).items():
        xs, counts = np.unique([int(s.t - start) for s in scoped], return_counts=True)
        throughput.plot(xs, counts, color=colours[version], linewidth=1.5, label=f"v{version}")
    throughput.set_title("requests per second, every group")
    throughput.set_ylabel("req/s")
    throughput.grid(True, alpha=0.3)
    throughput.legend(fontsize=7, loc="upper left", ncol=4)
    throughput.set_xlabel("seconds since start (x = failed request)")
    figure.suptitle("Latency over time by model version")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_locust(args: argparse.Namespace, samples_path: Path, html_path: Path) -> tuple[int | None, float]:
    """Locust's exit status (None = killed at the bound) and how long it ran."""
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", args.url, "--users", str(args.users), "--run-time", f"{args.duration}s",
        "--html", str(html_path), "--loglevel", "WARNING", "--exit-code-on-error", "0",
        "--model", args.model, "--cache-hit-share", str(args.cache_hit_share),
        "--routing-keys", str(args.routing_keys), "--collection", args.collection,
        "--think-time-s", str(args.think_time_s), "--samples-file", str(samples_path),
        *args.user_classes,
    ]  # fmt: skip
    started = time.monotonic()
    try:
        completed = subprocess.run(command, timeout=args.duration + args.grace, check=False)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - started
    return completed.returncode, time.monotonic() - started


def report(args: argparse.Namespace, samples: list[Sample], config: SloConfig, elapsed_s: float) -> int:
    """Print the results and the verdict, write loadtest.json and the PNG; the exit status."""
    span = max(s.t for s in samples) - min(s.t for s in samples) or elapsed_s
    groups: dict[str, dict[str, Stats]] = {}
    for group in sorted({s.group for s in samples}):
        scoped = [s for s in samples if s.group == group]
        groups[group] = {ALL_VERSIONS: stats(scoped, span)}
        groups[group].update({v: stats(vs, span) for v, vs in by_version(scoped).items()})
    judgements = judge(samples, config)

    print(f"\n{'group':<20} {'version':>8} {'requests':>9} {'errors':>7} {'req/s':>7} {'P50 ms':>8} {'P95 ms':>8}")
    for group, versions in groups.items():
        for version, s in versions.items():
            print(f"{group:<20} {version:>8} {s.requests:>9} {s.errors:>7} {s.per_s:>7} {s.p50_ms:>8} {s.p95_ms:>8}")
    print("\nSLO verdict:")
    for j in judgements:
        mark = "ok  " if j.met else "FAIL"
        scope = "all versions" if j.version == ALL_VERSIONS else f"v{j.version}"
        print(
            f"  {mark} {j.slo:<18} {scope:<12} P95 {j.p95_ms} ms (<= {j.p95_limit_ms}), "
            f"errors {j.error_rate:.2%} (<= {j.error_rate_limit:.2%}), {j.requests} requests"
        )
    passed = bool(judgements) and all(j.met for j in judgements)
    if not judgements:
        print("  no request matched any SLO in the config")
    print(f"\n{'PASS' if passed else 'FAIL'}: {sum(j.met for j in judgements)} of {len(judgements)} objectives met")

    png = args.out / "loadtest-latency.png"
    plot(samples, config, png)
    summary = {
        "url": args.url,
        "duration_s": args.duration,
        "elapsed_s": round(elapsed_s, 1),
        "users": args.users,
        "model": args.model,
        "cache_hit_share": args.cache_hit_share,
        "slo_file": str(args.slo),
        "groups": {g: {v: asdict(s) for v, s in vs.items()} for g, vs in groups.items()},
        "verdict": {"passed": passed, "objectives": [{**asdict(j), "met": j.met} for j in judgements]},
        "report": str(args.out / "loadtest.html"),
        "plot": str(png),
    }
    (args.out / "loadtest.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"report: {args.out / 'loadtest.html'}  plot: {png}  summary: {args.out / 'loadtest.json'}")
    return 0 if passed else EXIT_BREACH


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the gateway")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load (the stages fill them)")
    parser.add_argument("--users", type=int, default=16, help="simulated users at the peak stage")
    parser.add_argument("--slo", type=Path, default=DEFAULT_SLO, help="SLO thresholds (YAML)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the report, plot and summary")
    parser.add_argument("--model", default="minilm", help="model requested")
    parser.add_argument("--cache-hit-share", type=float, default=0.3, help="share of repeated (cached) texts")
    parser.add_argument("--routing-keys", type=int, default=1000, help="distinct x-routing-key values; 0 = none")
    parser.add_argument("--collection", default="loadtest", help="collection searched and upserted into")
    parser.add_argument("--think-time-s", type=float, default=0.2, help="longest pause of a user between requests")
    parser.add_argument("--grace", type=int, default=30, help="seconds past --duration before Locust is killed")
    parser.add_argument(
        "user_classes", nargs="*", help="user classes to run (default all: ShortTextUser LongTextUser CollectionUser)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # interleave with Locust's output
    config = SloConfig.load(args.slo)  # fail on a bad config before loading anything
    try:
        httpx.get(f"{args.url.rstrip('/')}/healthz", timeout=10)
    except httpx.TransportError as error:
        print(f"loadtest: cannot reach the gateway at {args.url}: {error}")
        return EXIT_RUN_FAILED
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loadtest-") as scratch:
        samples_path = Path(scratch) / "samples.jsonl"
        status, elapsed_s = run_locust(args, samples_path, args.out / "loadtest.html")
        if status is None:
            print(f"loadtest: Locust ran past its bound ({args.duration} s + {args.grace} s grace) and was stopped")
            return EXIT_RUN_FAILED
        samples = read_samples(samples_path)
    if status != 0:
        print(f"loadtest: Locust exited with status {status}")
        return EXIT_RUN_FAILED
    if not samples:
        print("loadtest: no request was made")
        return EXIT_RUN_FAILED
    return report(args, samples, config, elapsed_s)


if __name__ == "__main__":
    raise SystemExit(main())
