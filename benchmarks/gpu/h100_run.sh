#!/usr/bin/env bash
# One call on the lent H100 (see benchmarks/README.md): build llmcore with the machine's own
# toolchain, run the CUDA tests, then the GPU benchmarks, writing every log under $OUT.
#   bash benchmarks/gpu/h100_run.sh [tests] [bench] [train] [profile] [ncu] [corpus]   (default: tests bench train)
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/llmcore-gpu}
mkdir -p "$OUT"
phases=${*:-tests bench train}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

t0=$(date +%s)
# sm_90 only here: half the compile time of the default sm_80;sm_90.
python3 -m pip install -q --no-build-isolation --no-deps -Ccmake.define.LLMCORE_CUDA=ON \
    -Ccmake.define.LLMCORE_CUDA_ARCHS=90 -Cbuild-dir=/tmp/llmcore-build . > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
cd /tmp  # from here on, import the installed package, not the source tree
python3 -c "import json, llmcore; print(json.dumps(llmcore.info(), indent=1))" | tee "$OUT/info.json"

for phase in $phases; do
  case $phase in
    tests)
      python3 -m pytest -v -m cuda -p no:cacheprovider "$REPO/tests" 2>&1 \
          | tee "$OUT/cuda-tests.log" | grep -v "^SKIPPED\|PASSED" | tail -60 ;;
    bench)
      python3 -m llmcore.bench --device cuda --json "$OUT/h100-ops.json" 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
    train)
      python3 "$REPO/benchmarks/train_throughput.py" --device cuda --steps 20 \
          --json "$OUT/h100-train.json" 2>&1 | tee "$OUT/train.log" | tail -20 ;;
    corpus)  # the GPT-2 124M shape on the bundled Shakespeare (BPE 8192), a few hundred steps
      llmcore train --preset gpu-gpt2 --device cuda --steps 300 --eval-interval 100 --ckpt-interval 300 \
          --out /tmp/gpt2-run 2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|step/s\]$" | tee "$OUT/corpus-train.log" | tail -30
      cp /tmp/gpt2-run/metrics.jsonl "$OUT/corpus-metrics.jsonl" ;;
    profile)
      python3 "$REPO/benchmarks/gpu/profile_step.py" 2>&1 | tee "$OUT/profile.log" | head -50 ;;
    ncu)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
      "$NCU" --kernel-name regex:gemm --launch-skip 0 --launch-count 3 --section SpeedOfLight \
          --section Occupancy --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis \
          python3 "$REPO/benchmarks/gpu/ncu_gemm.py" > "$OUT/ncu.log" 2>&1
      grep -v "^    ---\|^ *$" "$OUT/ncu.log" | tail -150 ;;
  esac
done
