#!/usr/bin/env bash
# One call on the lent GPU machine: install what it lacks, run the GPU tests, run the benchmarks,
# print a short table last. Usage (from the repo root there):
#   bash scripts/gpu_session.sh tests [pytest args and paths]   # default: tests/kernels tests/runtime, then
#                                                               # tests/runtime again on CUDA cores only
#   bash scripts/gpu_session.sh bench [bench/kernels.py args]   # e.g. --only gemm,elementwise
#   bash scripts/gpu_session.sh e2e [--layers N] [--no-hf]      # bench/decode.py and step_profile.py (~8 min on an H200)
#   bash scripts/gpu_session.sh throughput [--layers N] [--no-hf] # bench/throughput.py (over 4 min with HF: a call of its own)
#   bash scripts/gpu_session.sh all                             # tests, kernels bench, e2e, throughput (past one 10-minute call)
#   bash scripts/gpu_session.sh tp [bench/tp.py args]           # 2 GPUs: tests/distributed, then tp=2 against tp=1
#   bash scripts/gpu_session.sh sweep [bench/gemm_sweep.py args] # e.g. --m 32 --budget 120: decode GEMM variants
#   bash scripts/gpu_session.sh attention [bench/attention_sweep.py args] # decode attention by partition count
#   bash scripts/gpu_session.sh versus --against bench/out/versus/SHA [DIR ...] [--only sampling,attention,...]
#                                                               # the tree's kernels beside those of a commit (or several),
#                                                               # exported here first: python3 bench/versus.py --export REV
#                                                               # (carry bench/out/versus with .whl)
# Each ends with bench/summary.py: one short table of what the run produced.
# The machine has no network: tests/convert (model downloads) stays out by default. Carry .whl
# (NumPy 2.4, gguf, pytest-xdist + execnet) with the call, and name the commit the figures are of:
#   INFINILM_NB_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_session.sh ...   (composed here)
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
# The machine's NumPy 2.5 breaks numba-cuda 0.30: a carried NumPy 2.4 wheel shadows it.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[[ -n ${INFINILM_NB_COMMIT:-} ]] || echo "INFINILM_NB_COMMIT is not set: the benches label their figures with this machine's git, which may lag the tree"
python3 -c "import numpy, numba, numba_cuda, cupy; print('numpy', numpy.__version__, 'numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'cupy', cupy.__version__)"
status=0
run_tests() {
  local args=("$@") paths=0
  for a in "${args[@]}"; do [[ $a == tests* ]] && paths=1; done
  (( paths )) || args+=(tests/kernels tests/runtime)
  # numba compiles every kernel variant in each process: with pytest-xdist (carried in .whl) the
  # compiles run side by side (in one process the suite took over 5 minutes on an H100).
  local workers=()
  python3 -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-6}")
  python3 -m pytest -q -rs -p no:cacheprovider -m "not slow" --durations=10 "${workers[@]}" \
    --junitxml="$OUT/gpu-tests.xml" "${args[@]}" 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
  status=${PIPESTATUS[0]}
  (( paths )) && return
  # The runtime's run above used the tensor-core paths (the default); the fallback must be right too.
  INFINILM_NB_TENSOR_CORES=0 python3 -m pytest -q -rs -p no:cacheprovider -m "not slow" "${workers[@]}" \
    --junitxml="$OUT/gpu-tests-cuda-cores.xml" tests/runtime 2>&1 | tee "$OUT/gpu-tests-cuda-cores.log" | tail -15
  (( status )) || status=${PIPESTATUS[0]}
}
layers() {  # the value of --layers among the e2e arguments (32 without it)
  local previous=""
  for a in "$@"; do [[ $previous == --layers ]] && { echo "$a"; return; }; previous=$a; done
  echo 32
}
run_e2e() {
  python3 bench/decode.py --out "$OUT" --model-dir /tmp/rl8b --ablate "$@" 2>&1 | tee "$OUT/decode.log" | tail -25
  # where the batch-1 step's GPU time goes, kernel by kernel (same checkpoint)
  python3 bench/step_profile.py --out "$OUT" --model-dir /tmp/rl8b --layers "$(layers "$@")" 2>&1 \
    | tee "$OUT/step_profile.log" | tail -14
}
run_throughput() {
  python3 bench/throughput.py --out "$OUT" --model-dir /tmp/rl8b "$@" 2>&1 | tee "$OUT/throughput.log" | tail -15
}
case $what in
  tests) run_tests "$@" ;;
  bench) python3 bench/kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
  e2e) run_e2e "$@" ;;
  throughput) run_throughput "$@" ;;
  tp) run_tests tests/distributed
      python3 bench/tp.py --out "$OUT" "$@" 2>&1 | grep -v "Loading weights" | tee "$OUT/tp.log" | tail -20 ;;
  sweep) python3 bench/gemm_sweep.py --out "$OUT" "$@" 2>&1 | tee "$OUT/sweep.log" | tail -40 ;;
  attention) python3 bench/attention_sweep.py --out "$OUT" "$@" 2>&1 | tee "$OUT/attention_sweep.log" | tail -150 ;;
  versus) python3 bench/versus.py --out "$OUT" "$@" 2>&1 | tee "$OUT/versus.log" | tail -60 ;;
  all) run_tests; python3 bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60; run_e2e; run_throughput ;;
  *) echo "usage: $0 tests|bench|e2e|throughput|all|tp|sweep|attention|versus [args]"; exit 2 ;;
esac
python3 bench/summary.py "$OUT"
exit $status
