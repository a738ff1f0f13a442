#!/bin/sh
# Compile the CUDA side of mine where there is no GPU and no CUDA torch: kernels.cu with plain nvcc for
# sm_80 and sm_90, then the torch bindings' CUDA branch (MINE_WITH_CUDA), syntax only, against this
# torch's headers. CI runs this so that a CUDA compile error fails the build on machines without a GPU.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for arch in sm_80 sm_90; do
  nvcc -std=c++17 -O3 -fmad=false -Werror all-warnings -arch="$arch" -c "$here/kernels.cu" -o "$out/kernels_$arch.o"
  echo "nvcc $arch: ok"
done
cuda_include=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^" ]*\)".*/\1/p' | head -1)
torch_includes=$(${PYTHON:-python3} -c "import sysconfig, torch.utils.cpp_extension as c
print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
# A CPU wheel lacks the one header CUDA builds generate; it only holds build macros.
mkdir -p "$out/stub/c10/cuda/impl" && : >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
# shellcheck disable=SC2086
c++ -std=c++20 -fsyntax-only -w -DMINE_WITH_CUDA -DTORCH_EXTENSION_NAME=check $torch_includes -I"$out/stub" \
  -I"$cuda_include" -I"$here" "$here/bindings.cpp"
echo "bindings (CUDA build): ok"
