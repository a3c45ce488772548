#!/usr/bin/env bash
# Run the local Triton Inference Server (from scripts/setup_triton.sh) in the foreground on a model repository.
# Usage: scripts/run_triton.sh REPO_DIR [HTTP_PORT GRPC_PORT METRICS_PORT [TRITONSERVER_ARGS...]]
#        (ports default to 8010 8011 8012; extra arguments go to tritonserver as they are)
# Every version in REPO_DIR is loaded at start; a version that fails to load stops the server
# (unless --exit-on-error=false is passed). TRITON_MODEL_CONTROL_MODE=explicit (default none) loads every
# model at start too, and later only through the repository API (the gateway's EMBEDSERVE_TRITON_MODEL_CONTROL).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/.triton
SERVER=$DEST/pytriton/tritonserver

if [[ $# -lt 1 ]]; then
  echo "usage: $0 REPO_DIR [HTTP_PORT GRPC_PORT METRICS_PORT [TRITONSERVER_ARGS...]]" >&2
  exit 2
fi
if ! compgen -G "$DEST/.complete-*" >/dev/null; then
  echo "triton: $DEST is not set up; run scripts/setup_triton.sh first" >&2
  exit 1
fi
REPO_DIR=$(cd "$1" && pwd)

# The python stub takes its interpreter from the first python on PATH (so the venv's numpy<2 and
# onnxruntime) and must load the libpython of that venv's base Python, not another 3.x on the system.
LIBPYTHON_DIR=$("$DEST/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
export PATH="$DEST/venv/bin:$PATH"
export LD_LIBRARY_PATH="$DEST/nvidia_pytriton.libs:$LIBPYTHON_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

MODE=${TRITON_MODEL_CONTROL_MODE:-none}
LOAD_ALL=()
[[ $MODE == explicit ]] && LOAD_ALL=(--load-model='*')

exec "$SERVER/bin/tritonserver" \
  --model-repository="$REPO_DIR" \
  --model-control-mode="$MODE" "${LOAD_ALL[@]}" \
  --disable-auto-complete-config \
  --strict-readiness=true \
  --backend-directory="$SERVER/backends" \
  --http-address=127.0.0.1 --http-port="${2:-8010}" \
  --grpc-address=127.0.0.1 --grpc-port="${3:-8011}" \
  --metrics-address=127.0.0.1 --metrics-port="${4:-8012}" \
  --allow-gpu-metrics=false --pinned-memory-pool-byte-size=0 \
  --log-verbose=0 \
  "${@:5}"
