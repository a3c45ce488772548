#!/usr/bin/env bash
# Set up a local, CPU-only Triton Inference Server in .triton/ (git-ignored) for development and tests.
# Triton comes from the nvidia-pytriton wheel (Triton 2.51, python backend only); pytriton itself is
# not installed because it pins numpy<2. Does nothing when .triton/ is already complete.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/.triton
PYTHON=${PYTHON:-python3.11}
PYTRITON_VERSION=0.7.0  # bundles Triton 2.51
STAMP=$DEST/.complete-$PYTRITON_VERSION

if [[ -f $STAMP ]]; then
  echo "triton: $DEST is complete"
  exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rm -rf "$DEST"
mkdir -p "$DEST"

echo "triton: downloading nvidia-pytriton==$PYTRITON_VERSION"
"$PYTHON" -m pip download -qq --no-deps --only-binary=:all: "nvidia-pytriton==$PYTRITON_VERSION" -d "$WORK"
echo "triton: unpacking the server, its libraries and the python backend"
"$PYTHON" -m zipfile -e "$WORK"/nvidia_pytriton-*.whl "$WORK/wheel"
# The binaries find their libraries by RPATH relative to the wheel's layout
# (bin/../../../nvidia_pytriton.libs), so that layout is kept under .triton/.
mv "$WORK/wheel/nvidia_pytriton.libs" "$DEST/"
mkdir -p "$DEST/pytriton/tritonserver/backends"
mv "$WORK/wheel/pytriton/tritonserver/bin" "$DEST/pytriton/tritonserver/"
mv "$WORK/wheel/pytriton/tritonserver/backends/python" "$DEST/pytriton/tritonserver/backends/"
STUBS=$WORK/wheel/pytriton/tritonserver/python_backend_stubs

echo "triton: creating the model environment $DEST/venv (numpy<2, onnxruntime)"
"$PYTHON" -m venv "$DEST/venv"
# numpy 2 makes the 2.51 python backend return empty output tensors.
"$DEST/venv/bin/python" -m pip install -qq --upgrade pip
"$DEST/venv/bin/python" -m pip install -qq "numpy>=1.26,<2" "onnxruntime>=1.20"

# The stub embeds libpython, so it must be built for the venv's Python version.
PY_VERSION=$("$DEST/venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [[ ! -f $STUBS/$PY_VERSION/triton_python_backend_stub ]]; then
  echo "triton: no python backend stub for Python $PY_VERSION in the wheel" >&2
  exit 1
fi
cp "$STUBS/$PY_VERSION/triton_python_backend_stub" "$DEST/pytriton/tritonserver/backends/python/"
# zipfile drops the executable bits.
chmod +x "$DEST/pytriton/tritonserver/bin/tritonserver" \
  "$DEST/pytriton/tritonserver/backends/python/triton_python_backend_stub"

# Fail here, not at the first model load, when a library cannot be found.
LIBPYTHON_DIR=$("$DEST/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
for binary in bin/tritonserver backends/python/libtriton_python.so backends/python/triton_python_backend_stub; do
  if LD_LIBRARY_PATH=$LIBPYTHON_DIR ldd "$DEST/pytriton/tritonserver/$binary" | grep 'not found' >&2; then
    echo "triton: $binary misses libraries (libpython$PY_VERSION.so needs a shared-library Python;" \
      "on Debian: apt-get install libpython$PY_VERSION)" >&2
    exit 1
  fi
done
touch "$STAMP"
echo "triton: ready in $DEST (start it with scripts/run_triton.sh REPO_DIR)"
