#!/usr/bin/env bash
# GPU check for a machine with no internet: torch with CUDA (>= 2.4), CPU or GPU onnxruntime,
# the project's small pure-Python dependencies. Installs nothing; under 8 minutes.
#
#   bash benchmarks/gpu_check.sh --prepare [--checkpoint CKPT]   # here, before carrying
#   bash benchmarks/gpu_check.sh [OUT]          # on the GPU machine (default benchmarks/results/gpu)
#   bash benchmarks/gpu_check.sh --dry-run [OUT]  # CPU only: checks the script, measures no GPU
#
# Writes OUT/summary.json: every section (environment, eager_latency, frozen_training, tensorrt)
# with status ran/skipped/failed and the reason. Details: benchmarks/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# 470 s for the sections, then the summary written so far stays; --prepare is not bounded.
case " $* " in
  *" --prepare "*) exec "$PYTHON" benchmarks/gpu_check.py "$@" ;;
  *) exec timeout --signal=INT --kill-after=10 470 "$PYTHON" benchmarks/gpu_check.py "$@" ;;
esac
