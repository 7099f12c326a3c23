#!/bin/sh
# The GPU checks in one command, for a machine lent for minutes (the workplace's `device` tool runs it in the
# repository root; it has torch, transformers, pyarrow and pytest, no Ray, datasets or s3fs):
#
#   sh bench/device_check.sh                 # CUDA tests, then the whole bench (1B and 8B shapes)
#   sh bench/device_check.sh --shapes 1b     # extra arguments go to bench/gpu.py
#
# Everything lands under $OUT (default /tmp/device-check): test_gpu.txt, bench.txt and bench/ (gpu.json, gpu.md,
# profile.md). Each part has a time limit, so one that hangs leaves time for the next; the bench writes its
# results after each shape, so a bench cut short keeps what it measured. TESTS_SECONDS and BENCH_SECONDS set
# the limits (120 and 420: 9 minutes in all, under a 10-minute command).
set -u
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    >> "$OUT/gpu.txt" 2>&1
timeout "${TESTS_SECONDS:-120}" python -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/test_gpu.txt" 2>&1
echo "tests/test_gpu.py rc=$?" | tee -a "$OUT/test_gpu.txt"
timeout "${BENCH_SECONDS:-420}" python bench/gpu.py --out "$OUT/bench" "$@" > "$OUT/bench.txt" 2>&1
echo "bench/gpu.py rc=$?" | tee -a "$OUT/bench.txt"
tail -n 3 "$OUT/test_gpu.txt"
cat "$OUT/bench/gpu.md" 2>/dev/null
