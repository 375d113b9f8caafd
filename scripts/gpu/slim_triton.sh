#!/usr/bin/env bash
# A Triton newer than the device's (FLA's gated backward asks for Triton >= 3.7.1 on Hopper) in a
# bundle small enough to carry (the wheel is 190 MiB; a call carries 64 MiB): the wheel unpacked,
# without the profiler library, instrumentation, CUPTI, ptxas / nvdisasm (the device's CUDA
# ptxas is used through TRITON_PTXAS_PATH) and with libtriton.so stripped; ~39 MiB as tar.xz.
#   bash scripts/gpu/slim_triton.sh [VERSION]   -> .peers/triton-VERSION-slim.tar.xz
# On the device: `linear_check.sh perf` unpacks it in front of the installed Triton when present.
set -euo pipefail
ver=${1:-3.7.1}
root=$(pwd)
pip=${PIP:-/work/venv/bin/pip}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 "triton==$ver" -d "$work"
mkdir "$work/x" && unzip -q "$work"/triton-*.whl -d "$work/x"
cd "$work/x/triton"
rm -rf backends/nvidia/lib/cupti backends/nvidia/bin/ptxas* backends/nvidia/bin/nvdisasm \
  _C/libproton.so instrumentation
strip --strip-unneeded _C/libtriton.so
cd "$work/x"
mkdir -p "$root/.peers"
out=$root/.peers/triton-$ver-slim.tar.xz
tar cf - . | xz -T2 -6 > "$out"
ls -la "$out"
