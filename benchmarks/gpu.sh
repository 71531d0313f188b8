#!/usr/bin/env bash
# The GPU checks, in one script of at most 8 minutes, for a machine with CUDA (the `device`
# tool lends one to some tasks). From the repository root:
#
#   bash benchmarks/gpu.sh            # writes benchmarks/GPU.md and benchmarks/results/*-cuda.json
#
# 1. the CUDA tests: every explainer on CUDA against the CPU (tests/explainers/test_contract.py),
#    neuron statistics, a whole run, autocast precisions and a Dask worker on the GPU
#    (tests/flows/test_cuda.py);
# 2. the peers benchmark on ResNet-50, fp32 and bf16 (the gradient CAMs, LRP, occlusion, RISE);
# 3. the scale benchmark on CUDA (512 images, light settings).
# Each step has its own time limit, so a slow step cannot starve the others; what ran is
# written to benchmarks/GPU.md even when a step fails.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { make env >/dev/null && PY=.venv/bin/python; }
OUT=benchmarks/GPU.md
LOG=$(mktemp -d)
status() { if [ "$1" -eq 0 ]; then echo "passed"; elif [ "$1" -eq 124 ]; then echo "timed out"; else echo "failed (exit $1)"; fi; }

"$PY" - <<'EOF' > "$LOG/env.txt" 2>&1
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'}")
EOF

timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
    tests/flows/test_cuda.py "tests/explainers/test_contract.py::test_cuda_matches_cpu" > "$LOG/tests.txt" 2>&1
T=$?
timeout 120 "$PY" benchmarks/peers.py --model resnet50 --device cuda --images 8 --reps 2 \
    --only "Grad-CAM" "LRP" "Occlusion" "RISE" "Integrated" > "$LOG/peers-fp32.txt" 2>&1
P32=$?
timeout 50 "$PY" benchmarks/peers.py --model resnet50 --device cuda --precision bf16 --images 8 --reps 1 \
    --no-peers --only "Occlusion" "RISE" "Integrated" > "$LOG/peers-bf16.txt" 2>&1
P16=$?
timeout 100 "$PY" benchmarks/scale.py --samples 512 --settings light --device cuda > "$LOG/scale.txt" 2>&1
S=$?

{
  echo "# GPU checks (benchmarks/gpu.sh)"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(cat "$LOG/env.txt")"
  echo
  echo "| step | result |"
  echo "|---|---|"
  echo "| CUDA tests | $(status $T): $(tail -n 1 "$LOG/tests.txt") |"
  echo "| peers, ResNet-50 fp32 | $(status $P32) |"
  echo "| peers, ResNet-50 bf16 | $(status $P16) |"
  echo "| scale, 512 images on CUDA | $(status $S) |"
  echo
  echo "## Peers (seconds per image: ours, peer, limit)"
  echo
  echo '```'
  grep -h -E '^\{"case"|^limit' "$LOG/peers-fp32.txt" "$LOG/peers-bf16.txt" || true
  echo '```'
  echo
  echo "## Scale on CUDA"
  echo
  echo '```'
  grep -E '"(wall_seconds|outside_model_share|explain maps/s|evaluate maps/s|neurons images/s|peak_rss_bytes)"' "$LOG/scale.txt" || tail -n 5 "$LOG/scale.txt"
  echo '```'
  echo
  echo "## Test output (last lines)"
  echo
  echo '```'
  tail -n 30 "$LOG/tests.txt"
  echo '```'
} > "$OUT"
cat "$OUT"
