#!/usr/bin/env bash
# One call on a lent GPU machine: install, run the whole test-suite on the GPU, tune, benchmark.
#   bash bench/gpu_session.sh [tests|cuda|tune|bench|linear|variants|divergences|overhead|topk|relational ...]
# (default: tests tune bench); results under $OUT (or ./gpu-out)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # extra wheels carried along (liger-kernel for the baseline)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
steps=${*:-tests tune bench}
cd /tmp  # import the installed package, not the source tree
for step in $steps; do
    case $step in
        tests) python3 -m pytest -q -p no:cacheprovider --rootdir="$OLDPWD" "$OLDPWD/tests" 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
        cuda)  python3 -m pytest -q -p no:cacheprovider --rootdir="$OLDPWD" "$OLDPWD/tests/test_kd_cuda.py" 2>&1 |
                   tee "$OUT/cuda.log" | tail -15 ;;
        tune)  python3 "$OLDPWD/bench/tune_kd.py" --json "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" ;;
        bench) fastkd bench --op all --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" ;;
        linear) fastkd bench --op linear --json "$OUT/linear.json" 2>&1 | tee "$OUT/linear.log" ;;  # issue 15's target
        variants) python3 "$OLDPWD/bench/kd_variants.py" --json "$OUT/variants.json" 2>&1 | tee "$OUT/variants.log" ;;
        divergences) python3 "$OLDPWD/bench/divergences.py" 2>&1 | tee "$OUT/divergences.log" ;;
        overhead) python3 "$OLDPWD/bench/profile_overhead.py" 256 100 2>&1 | head -12 | tee "$OUT/overhead.log"
                  fastkd bench --op overhead --json "$OUT/overhead.json" 2>&1 | tee -a "$OUT/overhead.log" ;;
        topk) fastkd bench --op topk --json "$OUT/topk.json" 2>&1 | tee "$OUT/topk.log" ;;  # issue 19: ragged/sampled on GPU
        relational) fastkd bench --op relational --json "$OUT/relational.json" 2>&1 | tee "$OUT/relational.log" ;;  # 21
    esac
done
