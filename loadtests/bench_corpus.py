"""make bench-corpus: a corpus bigger than memory should ever need, prepared and trained on in bounded memory.

Builds a corpus of ``--gigabytes`` of text (this machine's man pages, then synthetic documents made of
sentences of real words, with some e-mail addresses to scrub), then runs ``python -m trainer train`` on it as
a subprocess: the prepare step (stream, normalise, scrub, de-duplicate, tokenise into shards) and 20 steps of
a tiny scratch encoder fed by DataLoader workers. Records the training process's peak RSS (its own, and the
peak of the sum over it and its workers), the prepare throughput and the wall time, in
loadtests/results/bench_corpus.json.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from loadtests.manpages import load_man_pages

RESULTS = Path(__file__).parent / "results" / "bench_corpus.json"
MB = 2**20


@dataclass(frozen=True)
class Measurement:
    returncode: int
    # The process's own high-water mark (VmHWM, polled): not wait4's ru_maxrss, which on Linux carries the
    # parent's peak across fork and exec (a child of a 10 GB pytest process reports 10 GB).
    peak_rss_mb: float
    tree_peak_rss_mb: float  # the largest sum over the process and its live descendants, polled
    wall_s: float
    stderr: str


def _high_water_kb(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM); 0 once it has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def _tree_rss_kb(pid: int) -> int:
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue  # a process that ended, or a kernel thread without VmRSS
    return total


def measured_run(command: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> Measurement:
    """Run ``command``; its peak resident memory, with and without its descendants summed."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        peak_kb = own_peak_kb = 0
        done = threading.Event()

        def poll() -> None:
            nonlocal peak_kb, own_peak_kb
            while not done.wait(0.05):
                own_peak_kb = max(own_peak_kb, _high_water_kb(process.pid))
                peak_kb = max(peak_kb, _tree_rss_kb(process.pid))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        try:
            _, status = os.waitpid(process.pid, 0)  # the polls saw its high-water mark up to its last 50 ms
        finally:
            timer.cancel()
            done.set()
            poller.join()
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        tail = stderr.read().decode("utf-8", errors="replace")[-4000:]
    return Measurement(process.returncode, own_peak_kb / 1024, peak_kb / 1024, time.perf_counter() - started, tail)


def synthetic_documents(words: Sequence[str], seed: int) -> Iterator[str]:
    """Endless distinct documents of 3–30 sentences drawn from a pool of sentences of real words; one in 50
    names an e-mail address (for the PII scrubber)."""
    rng = random.Random(seed)
    pool = []
    for _ in range(20_000):
        sentence = rng.choices(words, k=rng.randint(6, 24))
        pool.append(" ".join(sentence).capitalize() + ".")
    number = 0
    while True:
        number += 1
        body = " ".join(rng.choices(pool, k=rng.randint(3, 30)))
        contact = f" Write to user{number}@example.com for details." if number % 50 == 0 else ""
        yield f"Record {number}. {body}{contact}"


def write_corpus(path: Path, megabytes: float, real_texts: Sequence[str], seed: int = 0) -> int:
    """A .txt corpus of about ``megabytes``: ``real_texts`` once, then synthetic documents of their words;
    its size in bytes."""
    words = sorted({word.strip(".,;:()[]\"'").lower() for text in real_texts for word in text.split()} - {""})
    target, written = int(megabytes * MB), 0
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for text in [*real_texts, *[]]:
            line = " ".join(text.split()) + "\n"
            handle.write(line)
            written += len(line.encode())
        for document in synthetic_documents(words, seed):
            if written >= target:
                break
            handle.write(document + "\n")
            written += len(document) + 1
    return written


def run_config(corpus: Path, output_dir: Path, steps: int, workers: int) -> dict[str, object]:
    """A tiny scratch encoder on whole-document views, fed by ``workers`` DataLoader processes."""
    return {
        "run_name": "bench-corpus",
        "output_dir": str(output_dir),
        "corpus": {"path": str(corpus), "validation_fraction": 0.01, "workers": workers},
        "encoder": {
            "base_model": None,
            "scratch": {"vocab_size": 8000, "hidden_size": 64, "layers": 2, "heads": 2, "max_seq_length": 128},
        },
        "objective": {"views": {"mix": {"crop": 0.5, "inverse_cloze": 0.5}}},
        "optim": {"max_steps": steps, "batch_size": 32, "learning_rate": 1e-3, "warmup_steps": 2},
        "checkpoint": {"every_steps": steps, "keep": 1},
        "monitor": {"eval_every_steps": steps, "validation_sample": 64},
    }


def train_measured(corpus: Path, work: Path, steps: int, workers: int, timeout_s: float) -> Measurement:
    """``python -m trainer train`` on ``corpus`` (prepare included) in a subprocess, measured."""
    config_file = work / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_config(corpus, work / "runs", steps, workers)))
    return measured_run([sys.executable, "-m", "trainer", "train", "--config", str(config_file)], timeout_s)


def real_passages(pages: int) -> list[str]:
    """Man page bodies cut into passages of about 1,500 characters."""
    passages = []
    for page in load_man_pages(pages):
        words = page.body.split()
        passages += [" ".join(words[i : i + 250]) for i in range(0, len(words), 250)]
    return passages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.0, help="corpus size")
    parser.add_argument("--pages", type=int, default=3000, help="man pages of real text in it")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as folder:
        work = Path(folder)
        real = real_passages(args.pages)
        began = time.perf_counter()
        size = write_corpus(work / "corpus.txt", args.gigabytes * 1024, real)
        print(f"corpus: {size / MB:.0f} MiB in {time.perf_counter() - began:.0f} s ({len(real)} man page passages)")
        run = train_measured(work / "corpus.txt", work, args.steps, args.workers, args.timeout)
        if run.returncode != 0:
            sys.exit(f"training failed ({run.returncode}):\n{run.stderr}")
        manifest = json.loads((work / "runs" / "bench-corpus" / "corpus" / "manifest.json").read_text())
        metrics = (work / "runs" / "bench-corpus" / "metrics.jsonl").read_text().splitlines()
    result = {
        "corpus_mib": round(size / MB, 1),
        "real_passages": len(real),
        "documents_read": manifest["report"]["documents_read"],
        "kept": manifest["report"]["kept"],
        "train_documents": manifest["train"]["documents"],
        "train_tokens": manifest["train"]["tokens"],
        "prepare_s": manifest["seconds"],
        "prepare_mib_per_s": round(size / MB / manifest["seconds"], 2),
        "steps": json.loads(metrics[-1])["step"],  # rows come every monitor.log_every_steps steps
        "wall_s": round(run.wall_s, 1),
        "train_after_prepare_s": round(run.wall_s - manifest["seconds"], 1),
        "peak_rss_mib": round(run.peak_rss_mb, 1),
        "peak_rss_sum_with_workers_mib": round(run.tree_peak_rss_mb, 1),
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "max_rss_of_this_process_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
