#!/usr/bin/env bash
# Everything issue 4 asks of a CUDA machine, in one call (or stage by stage when a call has a time limit):
#   bash benchmarks/run_gpu.sh                       # all stages: smoke tests bench kernels inductor
#   bash benchmarks/run_gpu.sh smoke tests kernels inductor   then   bash benchmarks/run_gpu.sh bench
#   BENCH_ARGS="-k bf16" bash benchmarks/run_gpu.sh bench   # pytest selection passed to the benchmark suite
# Stages:
#   smoke     the benchmark suite on the tiny shape on CUDA (a minute): every GPU code path, before the long run
#   tests     the CUDA test suite: python -m pytest tests -x -q
#   bench     the full benchmark suite (pytest-benchmark when importable, else benchmarks/run.py; same CSV),
#             the training step included; rows are written as they are measured, the table and plot at the end
#   kernels   PTX, TTGIR, registers and spills of the compiled ngkernels kernels (benchmarks/kernel_report.py)
#   inductor  what torch.compile generates for the eager expressions (benchmarks/inspect_compile.py)
# Output: $OUT/results/<device>.csv|md|png and inductor-<device>.md (also copied to benchmarks/results/),
# $OUT/kernels/ (PTX, kernels.md), $OUT/inductor/ (generated code),
# and a log per stage. Without $OUT everything goes to .benchmarks/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET NGKERNELS_BACKEND  # the GPU runs the compiled kernels; the interpreter is never timed
OUT=${OUT:-$PWD/.benchmarks/gpu}
mkdir -p "$OUT/results"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(smoke tests bench kernels inductor)
status=0

python - <<'EOF' | tee "$OUT/environment.txt"
import torch, triton, platform
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for name in ("pytest_benchmark", "matplotlib", "tqdm"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "missing")
EOF
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "no CUDA device: run_gpu.sh is for a GPU machine" >&2; exit 2; }

copy_results() {
  mkdir -p benchmarks/results
  cp "$OUT"/results/*.csv "$OUT"/results/*.md benchmarks/results/ 2>/dev/null
  cp "$OUT"/results/*.png benchmarks/results/ 2>/dev/null
  return 0
}

run_stage() {  # name, command...: run, log to $OUT/<name>.log, remember a failure and go on
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -ne 0 ] && status=1
  return 0
}

for stage in "${stages[@]}"; do
  case $stage in
    smoke)
      if python -c "import pytest_benchmark" 2>/dev/null; then
        run_stage smoke python -m pytest benchmarks --benchmark-enable --bench-shapes=smoke --bench-device=cuda \
          --bench-results "$OUT/smoke" -x -q
      else
        run_stage smoke python -m benchmarks.run --shapes smoke --device cuda --results "$OUT/smoke" \
          --train-step-rounds 2
      fi ;;
    tests)
      if python -c "import pytest_benchmark" 2>/dev/null; then
        run_stage tests python -m pytest tests -x -q
      else  # pyproject's addopts name a pytest-benchmark option, which pytest would reject
        run_stage tests python -m pytest tests -x -q -o addopts=-ra
      fi ;;
    bench)
      if python -c "import pytest_benchmark" 2>/dev/null; then
        # shellcheck disable=SC2086
        run_stage bench python -m pytest benchmarks --benchmark-enable --bench-shapes=full --bench-device=cuda \
          --bench-results "$OUT/results" --benchmark-json "$OUT/results/pytest-benchmark.json" -q ${BENCH_ARGS:-}
      else
        echo "pytest-benchmark is not importable: plain runner (same cases, same CSV)"
        # shellcheck disable=SC2086
        run_stage bench python -m benchmarks.run --shapes full --device cuda --results "$OUT/results" ${RUN_ARGS:-}
      fi
      copy_results ;;
    kernels)
      run_stage kernels python -m benchmarks.kernel_report --out "$OUT/kernels" ;;
    inductor)
      run_stage inductor python -m benchmarks.inspect_compile --device cuda --shapes S F XL \
        --results "$OUT/results" --code-dir "$OUT/inductor"
      copy_results ;;
    *)
      echo "unknown stage $stage (smoke tests bench kernels inductor)" >&2; status=2 ;;
  esac
done
exit $status
