#!/usr/bin/env bash
# Everything a GPU should check of `mine`, in one command, for whoever has one (a lent machine included):
# selftest on the tiny dense and MoE models and on the Qwen3-0.6B shape (every tap against the CPU twin
# and HF eager, the capture and graph paths, tokens/s next to HF), then the kernels' share of a decode
# step. Logs and JSON go to $OUT (default ./gpu-check). Exits non-zero if any selftest fails.
#
#     bash bench/gpu_check.sh
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$PWD/gpu-check}
mkdir -p "$out" /tmp/qwen3dbg-gpu-models
export PYTHONUNBUFFERED=1
# The checkout is installed offline (its dependencies are on the machine already), so the package imports the one
# way it is installed, and a lent machine's minutes are not lost to resolving or building anything.
python3 -m pip install -q --no-deps --no-build-isolation -e "$repo" || exit 1
cd /tmp
qwen3dbg() { python3 -c 'import sys; from qwen3dbg.cli import main; sys.argv[0] = "qwen3dbg"; main()' "$@"; }

nvidia-smi -L | tee "$out/device.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$out/device.txt"
status=0
for preset in tiny-dense tiny-moe qwen3-0.6b; do
  model=/tmp/qwen3dbg-gpu-models/$preset
  [ -f "$model/config.json" ] || qwen3dbg make-model "$model" --preset "$preset" >/dev/null || status=1
  qwen3dbg selftest --device cuda --model "$model" --json "$out/selftest-$preset.json" 2>&1 \
    | tee "$out/selftest-$preset.log" || status=1
done
python3 "$repo/bench/bench_mine.py" --device cuda --model /tmp/qwen3dbg-gpu-models/qwen3-0.6b --prompt-tokens 128 \
  --decode-steps 64 --profile 2>&1 | tee "$out/bench_mine.log" || status=1
exit $status
