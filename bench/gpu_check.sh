#!/usr/bin/env bash
# GPU readiness check (bench/gpu_check.py): capture overhead and MB/s of random-weight DiT-XL/2- and
# PixArt-XL-shaped models in fp16, and SAE training tokens/s at d=1152 with 16x and 64x latents. About five
# minutes on one current GPU; installs the project first if needed (the CUDA build of torch where
# nvidia-smi works). Last line: gpu_capture_overhead=<ratio>.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make install
exec .venv/bin/python bench/gpu_check.py "$@"
