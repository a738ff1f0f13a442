#!/usr/bin/env bash
# Install llama-cpp-python (CPU build) for the `llamacpp:` candidate and its tests.
# Reuses a wheel from the cache when one is there; otherwise builds one (4+ minutes on 2 cores) and keeps it.
# Usage: .ci/install_llamacpp.sh [PYTHON]   (cache: $QWEN3DBG_WHEELS, default ~/.cache/qwen3dbg/wheels)
set -euo pipefail
PY="${1:-python}"
WHEELS="${QWEN3DBG_WHEELS:-$HOME/.cache/qwen3dbg/wheels}"
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python into $WHEELS (no cached wheel)" >&2
  CMAKE_ARGS="-DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    nice -n 19 "$PY" -m pip wheel --no-deps "llama-cpp-python>=0.3" -w "$WHEELS"
fi
"$PY" -m pip install "$(ls -t "$WHEELS"/llama_cpp_python-*.whl | head -1)"
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
