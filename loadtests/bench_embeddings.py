"""make bench: the gateway against the machine's compute floor, raw ONNX Runtime and a naive server, in one run.

The packaged all-MiniLM-L6-v2 is exported here four ways, into a temporary repository:
  - unoptimised: the graph as torch traces it with transformers' default attention (what versions exported
    before graph optimisation hold) — the raw reference ``raw_ort_batch32_per_s``;
  - fused: padded, with ONNX Runtime's fused attention, bias-GELU and embedding layer-norm (``export.graph:
    fused``; what versions exported before the unpadded graph hold) — ``raw_ort_fused_*``;
  - optimised: what ``python -m trainer export`` writes now, the unpadded graph (every weight product on real
    tokens only) — ``raw_ort_optimized_*``, and what the gateway serves;
  - INT8: the per-channel dynamic quantisation of the optimised version (``python -m trainer quantize``).
Then, for short sentences (~22 tokens) and ~110-token paragraphs of real English text:
  1. the compute floor (``loadtests.compute_floor``): ONNX Runtime MatMul speed on the model's weight shapes ×
     the graph's FLOPs per token, on real tokens;
  2. raw ONNX Runtime in-process (tokenise + pad + run, the gateway's thread budget and session options):
     batch-32 throughput and single-input latency, the four graphs in alternating rounds;
  3. the gateway (cache off) at concurrency 1, 8, 32, 64, one input per request, with the padded vs real
     tokens of its batches at c=32; c=1 and c=32 again with idle threads not spinning; c=32 with float output;
  4. the gateway with every input cached; 5. the naive server (one request = one inference).
The machine is shared and noisy, so the verdicts are ratios against references measured in this run.
Requests use encoding_format=base64 (what the official OpenAI SDK asks for) unless named ``float``.
"""

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import matplotlib
import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from loadtests.compute_floor import GemmProbe, floor_of, graph_flops
from loadtests.http_load import run_load
from loadtests.processes import gateway, server_process
from service.backends.onnx import available_cpus
from service.models.session import cpu_session
from service.models.store import ONNX_FILE
from service.models.tokenization import TextTokenizer, pad_batch
from trainer.data.sample_text import paragraphs, sentences
from trainer.encoder import load_base, packaged_minilm
from trainer.release.bootstrap import bootstrap
from trainer.release.export import write_graph, write_onnx
from trainer.release.quantize import quantize_version

matplotlib.use("Agg")
from matplotlib import pyplot  # after the backend is chosen

RESULTS = Path(__file__).parent / "results" / "bench_embeddings.json"
PLOT = Path(__file__).parent / "results" / "bench_embeddings.png"
CONCURRENCIES = (1, 8, 32, 64)
PAIRED_ROUNDS = 3


def short_texts(tokenizer: TextTokenizer) -> list[str]:
    """Sentences of 15–30 tokens: about 22 on average."""
    candidates = list(sentences())
    lengths = [len(ids) for ids in tokenizer.encode(candidates, truncate=True)]
    return [text for text, n in zip(candidates, lengths, strict=True) if 15 <= n <= 30]


def bodies(texts: list[str], encoding_format: str = "base64") -> list[bytes]:
    return [json.dumps({"input": t, "model": "minilm", "encoding_format": encoding_format}).encode() for t in texts]


def build_graphs(work: Path) -> dict[str, Path]:
    """The four graphs of the packaged MiniLM: unoptimised, fused, optimised (a served repository) and INT8."""
    repository = work / "repository"
    print("exporting MiniLM: optimised version, unoptimised and fused graphs, INT8 version ...", flush=True)
    optimised = bootstrap(repository)
    assert optimised is not None
    unoptimised, fused = work / "unoptimised.onnx", work / "fused.onnx"
    base = load_base(packaged_minilm()).eval()
    write_onnx(base, unoptimised, attention="sdpa")
    write_graph(base, fused, "fused")
    # INT8 in a copy, so the served repository keeps one version (one session, spinning threads).
    int8_repository = work / "int8"
    shutil.copytree(optimised.parent, int8_repository / optimised.parent.name)
    int8 = quantize_version(int8_repository / optimised.parent.name / optimised.name, list(sentences()[:256]))
    return {
        "repository": repository,
        "unoptimised": unoptimised,
        "fused": fused,
        "optimised": optimised / ONNX_FILE,
        "int8": int8 / ONNX_FILE,
    }


def timed_run(session: ort.InferenceSession, tokenizer: TextTokenizer, texts: list[str]) -> float:
    """Seconds to embed ``texts`` as one batch in-process: tokenise, pad, run."""
    started = time.perf_counter()
    batch = pad_batch(tokenizer.encode(texts, truncate=True), tokenizer.pad_id)
    session.run(["embedding"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    return time.perf_counter() - started


def raw_ort(
    graphs: dict[str, Path], probe: GemmProbe, tokenizer: TextTokenizer, texts: list[str], seconds: float
) -> dict[str, dict[str, float]]:
    """Batch-32 throughput and single-input P50 of each graph, and the compute floor's MatMul passes, measured
    batch by batch in turns: the same 32 texts (and the same single text) through every graph, then one pass
    of the probe, again with the next texts. Every graph sees the same inputs, and whatever else the shared
    machine does touches all of them alike. Sessions are opened as the gateway opens them by default: its
    thread count, threads not spinning (``EMBEDSERVE_INFERENCE_SPINNING=off``; spinning sessions measured in
    turns made the ratios between graphs change by 20 % from run to run here)."""
    sessions = {name: cpu_session(path, probe.threads, spinning=False) for name, path in graphs.items()}
    for session in sessions.values():
        timed_run(session, tokenizer, texts[:32])  # first runs allocate: not timed
    batch_s = dict.fromkeys(sessions, 0.0)
    single_ms: dict[str, list[float]] = {name: [] for name in sessions}
    batches, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch_texts = [texts[(batches * 32 + i) % len(texts)] for i in range(32)]
        for name, session in sessions.items():
            batch_s[name] += timed_run(session, tokenizer, batch_texts)
            single_ms[name].append(timed_run(session, tokenizer, batch_texts[7:8]) * 1000)
        probe.run()
        batches += 1
    return {
        name: {
            "batch32_per_s": round(32 * batches / batch_s[name], 1),
            "single_p50_ms": round(float(np.median(single_ms[name])), 2),
        }
        for name in sessions
    }


def batch_tokens(url: str) -> tuple[float, float]:
    """(real tokens embedded, padded tokens run) so far, from the gateway's /metrics."""
    real = padded = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "embedserve_tokens_embedded_total":
                real += sample.value
            elif sample.name == "embedserve_batch_padded_tokens_sum":
                padded += sample.value
    return real, padded


def measure(url: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    result = asyncio.run(run_load(url, "/v1/embeddings", payloads, concurrency, seconds))
    return result.summary()


def bench_text_kind(
    kind: str, texts: list[str], graphs: dict[str, Path], tokenizer: TextTokenizer, seconds: float, logs: Path
) -> dict[str, Any]:
    threads = available_cpus()
    tokens = [len(ids) for ids in tokenizer.encode(texts, truncate=True)]
    figures: dict[str, Any] = {"texts": len(texts), "mean_tokens": round(float(np.mean(tokens)), 1)}
    print(f"[{kind}] compute floor, raw ONNX Runtime (unoptimised, fused, optimised, INT8) in turns ...", flush=True)
    mean_tokens = float(np.mean(tokens))
    probe = GemmProbe(graph_flops(graphs["unoptimised"], round(mean_tokens)), round(32 * mean_tokens), threads)
    raw_graphs = {name: graphs[name] for name in ("unoptimised", "fused", "optimised", "int8")}
    figures["raw_ort"] = raw_ort(raw_graphs, probe, tokenizer, texts, seconds * 3)
    floor = floor_of(probe, mean_tokens)
    figures["compute_floor_per_s"] = round(floor.inputs_per_s, 1)
    figures["matmul_gflops"] = round(floor.matmul_gflops, 1)
    figures["model_mflops_per_token"] = round(floor.flops_per_token / 1e6, 2)
    payloads = bodies(texts)
    env = {"EMBEDSERVE_MODEL_REPOSITORY": str(graphs["repository"]), "EMBEDSERVE_LOG_LEVEL": "WARNING"}
    uncached = {**env, "EMBEDSERVE_CACHE_ENABLED": "false"}
    with gateway(uncached, logs / "gateway.log") as url:
        for concurrency in CONCURRENCIES:
            print(f"[{kind}] gateway, cache off, concurrency {concurrency} ...", flush=True)
            before = batch_tokens(url)
            figures[f"gateway_c{concurrency}"] = measure(url, payloads, concurrency, seconds)
            real, padded = (after - start for after, start in zip(batch_tokens(url), before, strict=True))
            figures[f"gateway_c{concurrency}"]["padding_ratio"] = round(1 - real / padded, 3) if padded else None
        if kind == "short":
            print(f"[{kind}] gateway, float output, concurrency 32 ...", flush=True)
            figures["gateway_c32_float"] = measure(url, bodies(texts, "float"), 32, seconds)
            print(f"[{kind}] gateway and raw ONNX Runtime (c=32, c=1), in alternating rounds ...", flush=True)
            figures["paired"] = paired(url, payloads, graphs["optimised"], tokenizer, texts, seconds)
    if kind == "short":
        # The default does not spin (tails under contention); spinning on, for a gateway with its cores to itself.
        with gateway({**uncached, "EMBEDSERVE_INFERENCE_SPINNING": "on"}, logs / "gateway-spin.log") as url:
            for concurrency in (1, 32):
                print(f"[{kind}] gateway, threads spinning, concurrency {concurrency} ...", flush=True)
                figures[f"gateway_spin_c{concurrency}"] = measure(url, payloads, concurrency, seconds)
    with gateway(env, logs / "gateway-cached.log") as url:
        print(f"[{kind}] gateway, all cached ...", flush=True)
        for start in range(0, len(texts), 64):  # every text computed once, then only cache hits
            chunk = {"input": texts[start : start + 64], "model": "minilm"}
            httpx.post(f"{url}/v1/embeddings", json=chunk, timeout=120).raise_for_status()
        figures["cached_c32"] = measure(url, payloads, 32, seconds)
        figures["cached_c1"] = measure(url, payloads, 1, seconds / 2)
    with server_process(["loadtests.naive_server"], env, logs / "naive.log") as url:
        for concurrency in (1, 8, 32) if kind == "short" else (32,):
            print(f"[{kind}] naive server, concurrency {concurrency} ...", flush=True)
            figures[f"naive_c{concurrency}"] = measure(url, payloads, concurrency, seconds)
    return figures


def paired(
    url: str, payloads: list[bytes], served: Path, tokenizer: TextTokenizer, texts: list[str], seconds: float
) -> dict[str, Any]:
    """The gateway and raw ONNX Runtime on the graph it serves, in ``PAIRED_ROUNDS`` alternating rounds (the
    gateway idles while raw runs, and the other way round): c=32 against batch 32 for ``seconds`` / 2 each, c=1
    P50 against a single input's P50 for ``seconds`` / 4 each. The two figures of each verdict are measured in
    the same weather: measured apart, a gateway figure moved by ±15 % between runs on this shared machine and
    flipped the verdict. Also, for ``seconds`` / 2 a round, raw ONNX Runtime the way the gateway runs under load:
    batches of 16 side by side, one per thread, each on a one-thread session (reported, not a verdict)."""
    threads = available_cpus()
    session = cpu_session(served, threads, spinning=False)
    narrow = cpu_session(served, 1, spinning=False)
    timed_run(narrow, tokenizer, texts[:16])  # its first run allocates: not timed

    def raw(batch_size: int, duration: float, offset: int, on: ort.InferenceSession = session) -> list[float]:
        """Seconds per run of ``batch_size`` texts for ``duration`` seconds."""
        times: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < duration:
            first = offset + len(times) * batch_size
            times.append(timed_run(on, tokenizer, [texts[(first + i) % len(texts)] for i in range(batch_size)]))
        return times

    def side_by_side(duration: float, offset: int) -> float:
        """Inputs per second of ``threads`` threads each running batches of 16 on the one-thread session."""
        with ThreadPoolExecutor(threads) as pool:
            started = time.perf_counter()
            runs = pool.map(lambda lane: len(raw(16, duration, offset + 7919 * lane, narrow)), range(threads))
            return 16 * sum(runs) / (time.perf_counter() - started)

    rounds: dict[str, list[float]] = {
        name: []
        for name in (
            "gateway_c32_per_s",
            "raw_batch32_per_s",
            "raw_side_by_side_per_s",
            "gateway_c1_p50_ms",
            "raw_single_p50_ms",
        )
    }
    for index in range(PAIRED_ROUNDS):
        rounds["gateway_c32_per_s"].append(measure(url, payloads, 32, seconds / 2)["per_s"])
        batch_s = raw(32, seconds / 2, index * 997)
        rounds["raw_batch32_per_s"].append(round(32 * len(batch_s) / sum(batch_s), 1))
        rounds["raw_side_by_side_per_s"].append(round(side_by_side(seconds / 2, index * 983), 1))
        rounds["gateway_c1_p50_ms"].append(measure(url, payloads, 1, seconds / 4)["p50_ms"])
        rounds["raw_single_p50_ms"].append(round(1000 * float(np.median(raw(1, seconds / 4, index * 991))), 2))
    median = {name: float(np.median(values)) for name, values in rounds.items()}
    return {
        **rounds,
        "c32_ratio_of_medians": round(median["gateway_c32_per_s"] / median["raw_batch32_per_s"], 3),
        "c32_vs_side_by_side_ratio_of_medians": round(
            median["gateway_c32_per_s"] / median["raw_side_by_side_per_s"], 3
        ),
        "c1_p50_difference_of_medians_ms": round(median["gateway_c1_p50_ms"] - median["raw_single_p50_ms"], 2),
    }


def flatten(kind: str, figures: dict[str, Any]) -> dict[str, float | None]:
    """The headline keys (short text without prefix, paragraphs with ``paragraph_``)."""
    prefix = "" if kind == "short" else "paragraph_"
    raw, floor = figures["raw_ort"], figures["compute_floor_per_s"]
    keys: dict[str, float | None] = {
        "compute_floor_per_s": floor,
        "raw_ort_batch32_per_s": raw["unoptimised"]["batch32_per_s"],
        "raw_ort_single_p50_ms": raw["unoptimised"]["single_p50_ms"],
        "raw_ort_fused_batch32_per_s": raw["fused"]["batch32_per_s"],
        "raw_ort_fused_single_p50_ms": raw["fused"]["single_p50_ms"],
        "raw_ort_optimized_batch32_per_s": raw["optimised"]["batch32_per_s"],
        "raw_ort_optimized_single_p50_ms": raw["optimised"]["single_p50_ms"],
        "raw_ort_int8_batch32_per_s": raw["int8"]["batch32_per_s"],
        "raw_ort_int8_single_p50_ms": raw["int8"]["single_p50_ms"],
        "gateway_c1_p50_ms": figures["gateway_c1"]["p50_ms"],
        "gateway_c32_per_s": figures["gateway_c32"]["per_s"],
        "gateway_c32_p99_ms": figures["gateway_c32"]["p99_ms"],
        "padding_ratio_c32": figures["gateway_c32"]["padding_ratio"],
        "naive_c32_per_s": figures["naive_c32"]["per_s"],
        "cached_c32_per_s": figures["cached_c32"]["per_s"],
        "cached_c32_p99_ms": figures["cached_c32"]["p99_ms"],
    }
    raw_keys = ("raw_ort_batch32_per_s", "raw_ort_fused_batch32_per_s", "raw_ort_optimized_batch32_per_s")
    for name in (*raw_keys, "raw_ort_int8_batch32_per_s"):
        keys[name.removesuffix("_per_s") + "_pct_of_floor"] = round(100 * float(keys[name] or 0) / floor, 1)
    keys["gateway_c32_pct_of_floor"] = round(100 * figures["gateway_c32"]["per_s"] / floor, 1)
    out = {prefix + key: value for key, value in keys.items()}
    if kind == "short":
        rounds = figures["paired"]
        out["gateway_c32_vs_raw_optimized_paired"] = rounds["c32_ratio_of_medians"]
        out["gateway_c1_p50_minus_raw_optimized_single_paired_ms"] = rounds["c1_p50_difference_of_medians_ms"]
        out["raw_ort_optimized_side_by_side_per_s"] = float(np.median(rounds["raw_side_by_side_per_s"]))
        out["gateway_c32_vs_raw_optimized_side_by_side_paired"] = rounds["c32_vs_side_by_side_ratio_of_medians"]
        out["compute_floor_short_per_s"] = out.pop("compute_floor_per_s")
    else:
        out["compute_floor_paragraph_per_s"] = out.pop("paragraph_compute_floor_per_s")
    return out


def verdicts(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    raw, optimised = flat["raw_ort_batch32_per_s"], flat["raw_ort_optimized_batch32_per_s"]
    checks = {
        "raw_optimized_vs_raw_batch32": (optimised / raw, ">=", 1.25),
        "gateway_c32_vs_raw_optimized_batch32": (flat["gateway_c32_per_s"] / optimised, ">=", 0.85),
        # The same ratio from alternating rounds (``paired``): both figures in the same weather.
        "gateway_c32_vs_raw_optimized_paired": (flat["gateway_c32_vs_raw_optimized_paired"], ">=", 0.85),
        "raw_optimized_share_of_floor": (optimised / flat["compute_floor_short_per_s"], ">=", 0.60),
        "gateway_c1_p50_minus_raw_optimized_single_p50_ms": (
            flat["gateway_c1_p50_ms"] - flat["raw_ort_optimized_single_p50_ms"],
            "<=",
            2.0,
        ),
        "gateway_c1_p50_minus_raw_optimized_single_paired_ms": (
            flat["gateway_c1_p50_minus_raw_optimized_single_paired_ms"],
            "<=",
            2.0,
        ),
        "padding_ratio_c32": (flat["padding_ratio_c32"], "<=", 0.25),
    }
    return {
        name: {
            "value": round(value, 3),
            "target": f"{op} {target}",
            "pass": value >= target if op == ">=" else value <= target,
        }
        for name, (value, op, target) in checks.items()
    }


def plot(figures: dict[str, Any], path: Path) -> None:
    """Throughput vs concurrency (short sentences): gateway, naive server, raw ONNX Runtime and the floor."""
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    axes.plot(CONCURRENCIES, [figures[f"gateway_c{c}"]["per_s"] for c in CONCURRENCIES], "o-", label="gateway")
    naive = [c for c in (1, 8, 32) if f"naive_c{c}" in figures]
    axes.plot(naive, [figures[f"naive_c{c}"]["per_s"] for c in naive], "s-", label="naive server")
    for name, style in (("unoptimised", ":"), ("fused", (0, (1, 4))), ("optimised", "--"), ("int8", "-.")):
        axes.axhline(figures["raw_ort"][name]["batch32_per_s"], linestyle=style, color="grey")
        axes.annotate(f"raw ORT {name}, batch 32", (1, figures["raw_ort"][name]["batch32_per_s"]), fontsize=8)
    axes.axhline(figures["compute_floor_per_s"], color="black")
    axes.annotate("compute floor", (1, figures["compute_floor_per_s"]), fontsize=8)
    axes.set_xscale("log", base=2)
    axes.set_xticks(CONCURRENCIES, [str(c) for c in CONCURRENCIES])
    axes.set_xlabel("concurrent clients (one short sentence per request)")
    axes.set_ylabel("sentences / s")
    axes.set_ylim(bottom=0)
    axes.legend(loc="lower right")
    axes.set_title("make bench: throughput vs concurrency, same run")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix extensions (what decides the floor and whether INT8 pays)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx", "fma", "amx", "vnni", "f16c")
    return sorted({flag for flag in flags.split(":", 1)[1].split() if flag.startswith(wanted) or "vnni" in flag})


def print_table(report: dict[str, Any]) -> None:
    for kind in ("short", "paragraph"):
        figures = report["runs"][kind]
        print(f"\n{kind} texts ({figures['texts']} distinct, {figures['mean_tokens']} tokens on average)")
        print(f"  compute floor {figures['compute_floor_per_s']}/s ({figures['matmul_gflops']} GFLOP/s)")
        for name, raw in figures["raw_ort"].items():
            print(f"  raw ONNX Runtime {name}: batch 32 {raw['batch32_per_s']}/s, single P50 {raw['single_p50_ms']} ms")
        print(f"  {'scenario':<22}{'per_s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
        for name, row in figures.items():
            if isinstance(row, dict) and "per_s" in row:
                print(
                    f"  {name:<22}{row['per_s']:>9}{row['p50_ms']:>9}{row['p95_ms']:>9}"
                    f"{row['p99_ms']:>9}{row['errors']:>8}"
                )
    print("\nverdicts (short text)")
    for name, verdict in report["verdicts"].items():
        print(f"  {'PASS' if verdict['pass'] else 'FAIL'}  {name} = {verdict['value']} (target {verdict['target']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per scenario")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    report: dict[str, Any] = {
        "machine": {
            "cpus": available_cpus(),
            "cpu_flags": cpu_flags(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "onnxruntime": ort.__version__,
        },
        "encoding_format": "base64",
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as work:
        graphs = build_graphs(Path(work))
        tokenizer = TextTokenizer(graphs["optimised"].parent / "tokenizer.json", 256)
        logs = Path(work) / "logs"
        logs.mkdir()
        report["runs"]["short"] = bench_text_kind(
            "short", short_texts(tokenizer), graphs, tokenizer, args.seconds, logs
        )
        report["runs"]["paragraph"] = bench_text_kind(
            "paragraph", list(paragraphs()), graphs, tokenizer, args.seconds, logs
        )
    report.update(flatten("short", report["runs"]["short"]))
    report.update(flatten("paragraph", report["runs"]["paragraph"]))
    report["verdicts"] = verdicts(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report["runs"]["short"], args.plot)
    print_table(report)
    print(f"\nwritten to {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
