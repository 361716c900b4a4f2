#!/usr/bin/env bash
# One call on the lent GPU machine: install what it lacks, run the GPU tests, run the benchmarks,
# print a short table last. Usage (from the repo root there): bash scripts/gpu_session.sh [tests|bench|all] [pytest args...]
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
python3 -c "import numpy, numba, numba_cuda, cupy; print('numpy', numpy.__version__, 'numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'cupy', cupy.__version__)"
status=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" "$@" tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if [[ $what == bench || $what == all ]]; then
  python3 bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
exit $status
