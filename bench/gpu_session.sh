#!/usr/bin/env bash
# Everything a lent GPU is for, in one command of at most 8 minutes: the forward, the
# forward+backward and the decoding benchmarks (vs FlexAttention and SDPA, in one process each), the
# gpu-marked tests, and the static kernel statistics of the Triton in use; each step is
# time-boxed. It writes at most 8 files under $OUT (default bench/out) and prints a short table
# last. `bash bench/gpu_session.sh --smoke` runs the same steps on the CPU, tiny, under Triton's
# interpreter (try it before spending device time).
#
# The lent machines reach no package registry and have no lark or pytest; they travel as
# wheels. Once, in the checkout:
#
#     echo /.whl/ >> .git/info/exclude
#     pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux2014_x86_64 -d .whl lark pytest pluggy iniconfig packaging
#
# then run it with `.whl` carried (the device tool's `carry`). Record what it measured in
# bench/RESULTS.md with the device / date / versions lines it prints.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
SMOKE=""
# one budget for the whole session: each step gets a slice (seconds)
FWD_S=${FWD_S:-185} BWD_S=${BWD_S:-150} DEC_S=${DEC_S:-60} TEST_S=${TEST_S:-30} STATIC_S=${STATIC_S:-40}
OVH_S=${OVH_S:-20}
if [ "${1:-}" = "--smoke" ]; then
    SMOKE="--smoke"
    export TRITON_INTERPRET=1
    FWD_S=1800 BWD_S=1800 DEC_S=600  # the interpreter is slow; nothing is timed on the CPU
else
    unset TRITON_INTERPRET
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/setup.txt" 2>&1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# attnc from the checkout without installing: the package-dir mapping of pyproject.toml, as links
mkdir -p /tmp/attnc-src/attnc
for d in dsl lowering runtime stdlib; do ln -sfn "$PWD/$d" "/tmp/attnc-src/attnc/$d"; done
for f in attnc/*.py; do ln -sfn "$PWD/$f" "/tmp/attnc-src/$f"; done
export PYTHONPATH="/tmp/attnc-src:$PYTHONPATH"
{
    nvidia-smi 2>&1 | head -15
    python -c "import torch, triton, attnc; print('torch', torch.__version__, 'triton', triton.__version__, 'attnc', attnc.__version__)"
} >>"$OUT/setup.txt" 2>&1

status=0
step() {  # step NAME SECONDS OUTFILE COMMAND...: run time-boxed, stderr to errors.txt
    local name=$1 secs=$2 out=$3; shift 3
    local start=$SECONDS
    timeout "$secs" "$@" >"$out" 2>>"$OUT/errors.txt"
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/setup.txt"
    [ "$rc" -eq 0 ] || status=1
}
step forward "$FWD_S" "$OUT/forward.md" python bench/forward.py $SMOKE
step backward "$BWD_S" "$OUT/backward.md" python bench/backward.py $SMOKE
step decode "$DEC_S" "$OUT/decode.md" python bench/decode.py $SMOKE
step overhead "$OVH_S" "$OUT/overhead.md" python bench/overhead.py
if [ -z "$SMOKE" ]; then
    step gpu-tests "$TEST_S" "$OUT/gpu-tests.txt" python -m pytest -m gpu -q -p no:cacheprovider -x
    cat "$OUT/gpu-tests.txt" >>"$OUT/setup.txt" && rm -f "$OUT/gpu-tests.txt"  # 8 files at most
    step static "$STATIC_S" "$OUT/static.md" python bench/static.py --patterns causal,document,sharp_topk
fi
python bench/summary.py "$OUT/forward.md" "$OUT/backward.md" | tee "$OUT/summary.md"
grep '^|' "$OUT/decode.md" | tee -a "$OUT/summary.md"
exit "$status"
