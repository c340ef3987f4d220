#!/usr/bin/env bash
# Everything a lent GPU is for, in one command: the gpu-marked tests, the forward and the
# forward+backward throughput benchmarks (vs FlexAttention and SDPA), and the static kernel
# statistics for the same Triton, each into its own file under $OUT (default bench/out).
#
# The lent machines reach no package registry, but their torch brings sympy and networkx; lark
# (and pytest / hypothesis for the tests) travel as wheels. Once, on a machine with a registry:
#
#     pip download --no-deps -d .wheels lark hypothesis sortedcontainers attrs pytest pluggy iniconfig
#     echo /.wheels/ >> .git/info/exclude
#
# then run this with `.wheels` carried (the device tool's `carry`):  bash bench/gpu_session.sh
# Record what it measured in bench/RESULTS.md with the device / date / versions line it prints.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET

if [ -d .wheels ]; then
    pip install -q --no-index --find-links .wheels lark hypothesis pytest >"$OUT/install.txt" 2>&1
fi
pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.txt" 2>&1 || {
    echo "attnc did not install; see $OUT/install.txt"; exit 1; }
nvidia-smi >"$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    >>"$OUT/device.txt" 2>&1

status=0
python -m pytest -m gpu -q -p no:cacheprovider >"$OUT/gpu-tests.txt" 2>&1 || status=1
tail -3 "$OUT/gpu-tests.txt"
python bench/forward.py >"$OUT/forward.md" 2>"$OUT/forward.err" || status=1
python bench/backward.py >"$OUT/backward.md" 2>"$OUT/backward.err" || status=1
python bench/static.py >"$OUT/static.md" 2>/dev/null || status=1
cat "$OUT/forward.md" "$OUT/backward.md"
exit "$status"
