#!/usr/bin/env bash
# The benchmark's peers, packed for a GPU machine that cannot download them: FlashMLA's Hopper kernels
# (the sgl-flash-mla wheel) and FlashInfer with its MLA backends. Run it where PyPI is reachable; it
# writes two tarballs into DEST (default .peerwheels/, ignored by git), which scripts/gpu_check.sh
# unpacks onto PYTHONPATH for scripts/bench.py. With network on the GPU machine, installing the same
# versions with pip does the same: pip install sgl-flash-mla==1.0.0 flashinfer-python==0.7.2.post1
#
#   bash scripts/peer_wheels.sh [DEST]      PYTHON_VERSION=3.12 by default: the GPU machine's Python
set -euo pipefail
dest=${1:-.peerwheels}
python_version=${PYTHON_VERSION:-3.12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest"

# Binary wheels for the GPU machine's Python and platform, whatever this machine runs.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$work/wheels" \
  sgl-flash-mla==1.0.0 flashinfer-python==0.7.2.post1 apache-tvm-ffi==0.1.12

unpack() {   # unpack() DIR WHEEL...: wheels are zip files; unpacked, a directory on PYTHONPATH imports them
  local into=$1; shift
  mkdir -p "$into"
  for wheel in "$@"; do python3 -m zipfile -e "$wheel" "$into"; done
}
unpack "$work/flashmla" "$work"/wheels/sgl_flash_mla-*.whl
unpack "$work/flashinfer" "$work"/wheels/flashinfer_python-*.whl "$work"/wheels/apache_tvm_ffi-*.whl
# FlashInfer compiles its MLA kernels on first use from the top-level files of data/csrc (and the bundled
# CUTLASS, CCCL and spdlog headers); the subdirectories hold other kernels' sources and most of the size.
find "$work/flashinfer/flashinfer/data/csrc" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +

tar -C "$work/flashmla" -cJf "$dest/flashmla.tar.xz" .
tar -C "$work/flashinfer" -cJf "$dest/flashinfer.tar.xz" .
du -sh "$dest"/*.tar.xz
