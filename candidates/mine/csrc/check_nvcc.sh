#!/bin/sh
# Compile the CUDA kernels with plain nvcc for sm_80 and sm_90: no GPU and no CUDA torch needed.
# CI runs this so that a CUDA compile error fails the build on machines without a GPU.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for arch in sm_80 sm_90; do
  nvcc -std=c++17 -O3 -fmad=false -Werror all-warnings -arch="$arch" -c "$here/kernels.cu" -o "$out/kernels_$arch.o"
  echo "nvcc $arch: ok"
done
