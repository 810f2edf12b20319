#!/usr/bin/env bash
# GPU benchmark: random Llama-2-7B-shaped model in bf16 on one GPU, no network needed.
# Profiling tokens/s vs a plain forward+backward (batch 1-16 at 512 tokens), Wanda pruning of
# all 32 layers with 128 x 2048 calibration tokens, peak GPU memory. Bounded to 8 minutes.
# Results: benchmarks/results/gpu-<date>.json and a section appended to BENCHMARKS.md.
# Check the script on CPU with a toy shape: benchmarks/gpu.sh --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 470 "$PY" benchmarks/gpu.py "$@"
