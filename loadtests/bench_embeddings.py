"""make bench: the gateway against raw ONNX Runtime and a naive server, measured in one run.

Phases, for short sentences (~22 tokens) and ~110-token paragraphs of real English text:
  1. raw ONNX Runtime in-process on the same model.onnx (tokenise + pad + run): batch 32 throughput and
     single-input latency — the reference;
  2. the gateway with the cache off: throughput at concurrency 1, 8, 32, 64, one input per request;
     P50/P95/P99 latency at concurrency 1 and 32;
  3. the gateway with every input already cached;
  4. the naive server (one request = one inference) at concurrency 32.
The machine is shared and noisy, so the verdicts are ratios against references measured in this run.
Requests use encoding_format=base64, what the official OpenAI SDK asks for by default.
"""

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from loadtests.http_load import run_load
from loadtests.processes import gateway, server_process
from service.models.tokenization import TextTokenizer, pad_batch
from trainer.data.sample_text import paragraphs, sentences

RESULTS = Path(__file__).parent / "results" / "bench_embeddings.json"


def short_texts(tokenizer: TextTokenizer) -> list[str]:
    """Sentences of 15–30 tokens: about 22 on average."""
    candidates = list(sentences())
    lengths = [len(ids) for ids in tokenizer.encode(candidates, truncate=True)]
    return [text for text, n in zip(candidates, lengths, strict=True) if 15 <= n <= 30]


def bodies(texts: list[str]) -> list[bytes]:
    return [json.dumps({"input": t, "model": "minilm", "encoding_format": "base64"}).encode() for t in texts]


def raw_ort(onnx_path: Path, tokenizer: TextTokenizer, texts: list[str], seconds: float) -> dict[str, float]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def run(batch_texts: list[str]) -> None:
        batch = pad_batch(tokenizer.encode(batch_texts, truncate=True), tokenizer.pad_id)
        session.run(["embedding"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})

    for start in range(0, 64, 32):
        run(texts[start : start + 32])
    done, index, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run([texts[(index + i) % len(texts)] for i in range(32)])
        index += 32
        done += 32
    batch32_per_s = done / (time.perf_counter() - started)
    single_ms: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds / 2:
        t0 = time.perf_counter()
        run([texts[len(single_ms) % len(texts)]])
        single_ms.append((time.perf_counter() - t0) * 1000)
    return {"batch32_per_s": batch32_per_s, "single_p50_ms": float(np.median(single_ms))}


def measure(url: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    result = asyncio.run(run_load(url, "/v1/embeddings", payloads, concurrency, seconds))
    return result.summary()


def bench_text_kind(
    kind: str, texts: list[str], repository: Path, tokenizer: TextTokenizer, seconds: float, logs: Path
) -> dict[str, Any]:
    print(f"[{kind}] raw ONNX Runtime ...", flush=True)
    figures: dict[str, Any] = {"texts": len(texts)}
    raw = raw_ort(repository / "minilm" / "1" / "model.onnx", tokenizer, texts, seconds)
    figures["raw_ort_batch32_per_s"] = round(raw["batch32_per_s"], 1)
    figures["raw_ort_single_p50_ms"] = round(raw["single_p50_ms"], 2)
    payloads = bodies(texts)
    env = {"EMBEDSERVE_MODEL_REPOSITORY": str(repository), "EMBEDSERVE_LOG_LEVEL": "WARNING"}
    with gateway({**env, "EMBEDSERVE_CACHE_ENABLED": "false"}, logs / "gateway.log") as url:
        for concurrency in (1, 8, 32, 64):
            print(f"[{kind}] gateway, cache off, concurrency {concurrency} ...", flush=True)
            figures[f"gateway_c{concurrency}"] = measure(url, payloads, concurrency, seconds)
    with gateway(env, logs / "gateway-cached.log") as url:
        print(f"[{kind}] gateway, all cached ...", flush=True)
        for start in range(0, len(texts), 64):  # every text computed once, then only cache hits
            chunk = {"input": texts[start : start + 64], "model": "minilm"}
            httpx.post(f"{url}/v1/embeddings", json=chunk, timeout=120).raise_for_status()
        figures["cached_c32"] = measure(url, payloads, 32, seconds)
        figures["cached_c1"] = measure(url, payloads, 1, seconds / 2)
    with server_process(["loadtests.naive_server"], env, logs / "naive.log") as url:
        print(f"[{kind}] naive server, concurrency 32 ...", flush=True)
        figures["naive_c32"] = measure(url, payloads, 32, seconds)
    return figures


def flatten(kind: str, figures: dict[str, Any]) -> dict[str, float]:
    """The headline keys (short text without prefix, paragraphs with ``paragraph_``)."""
    prefix = "" if kind == "short" else "paragraph_"
    keys = {
        "raw_ort_batch32_per_s": figures["raw_ort_batch32_per_s"],
        "raw_ort_single_p50_ms": figures["raw_ort_single_p50_ms"],
        "gateway_c1_p50_ms": figures["gateway_c1"]["p50_ms"],
        "gateway_c32_per_s": figures["gateway_c32"]["per_s"],
        "gateway_c32_p99_ms": figures["gateway_c32"]["p99_ms"],
        "naive_c32_per_s": figures["naive_c32"]["per_s"],
        "cached_c32_per_s": figures["cached_c32"]["per_s"],
        "cached_c32_p99_ms": figures["cached_c32"]["p99_ms"],
    }
    return {prefix + key: value for key, value in keys.items()}


def verdicts(flat: dict[str, float]) -> dict[str, dict[str, Any]]:
    checks = {
        "gateway_c32_vs_raw_batch32": (flat["gateway_c32_per_s"] / flat["raw_ort_batch32_per_s"], ">=", 0.8),
        "gateway_c32_vs_naive_c32": (flat["gateway_c32_per_s"] / flat["naive_c32_per_s"], ">=", 4.0),
        "gateway_c1_p50_minus_raw_single_p50_ms": (
            flat["gateway_c1_p50_ms"] - flat["raw_ort_single_p50_ms"],
            "<=",
            3.0,
        ),
        "cached_c32_vs_gateway_c32": (flat["cached_c32_per_s"] / flat["gateway_c32_per_s"], ">=", 5.0),
        "cached_c32_p99_ms": (flat["cached_c32_p99_ms"], "<=", 15.0),
    }
    return {
        name: {
            "value": round(value, 3),
            "target": f"{op} {target}",
            "pass": value >= target if op == ">=" else value <= target,
        }
        for name, (value, op, target) in checks.items()
    }


def print_table(report: dict[str, Any]) -> None:
    for kind in ("short", "paragraph"):
        figures = report["runs"][kind]
        print(f"\n{kind} texts ({figures['texts']} distinct)")
        print(
            f"  raw ONNX Runtime: batch 32 {figures['raw_ort_batch32_per_s']}/s, single P50 "
            f"{figures['raw_ort_single_p50_ms']} ms"
        )
        print(f"  {'scenario':<22}{'per_s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
        for name in ("gateway_c1", "gateway_c8", "gateway_c32", "gateway_c64", "cached_c1", "cached_c32", "naive_c32"):
            row = figures[name]
            print(
                f"  {name:<22}{row['per_s']:>9}{row['p50_ms']:>9}{row['p95_ms']:>9}{row['p99_ms']:>9}{row['errors']:>8}"
            )
    print("\nverdicts (short text)")
    for name, verdict in report["verdicts"].items():
        print(f"  {'PASS' if verdict['pass'] else 'FAIL'}  {name} = {verdict['value']} (target {verdict['target']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per scenario")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    tokenizer = TextTokenizer(args.repository / "minilm" / "1" / "tokenizer.json", 256)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "encoding_format": "base64",
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as logs:
        report["runs"]["short"] = bench_text_kind(
            "short", short_texts(tokenizer), args.repository, tokenizer, args.seconds, Path(logs)
        )
        report["runs"]["paragraph"] = bench_text_kind(
            "paragraph", list(paragraphs()), args.repository, tokenizer, args.seconds, Path(logs)
        )
    report.update(flatten("short", report["runs"]["short"]))
    report.update(flatten("paragraph", report["runs"]["paragraph"]))
    report["verdicts"] = verdicts(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
