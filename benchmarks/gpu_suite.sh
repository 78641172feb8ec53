#!/usr/bin/env bash
# The GPU suite of moebalance: one command, run from the checkout without installing anything.
#
#   bash benchmarks/gpu_suite.sh                 # on a CUDA GPU (an H200 with torch + triton): about 5 minutes,
#                                                # hard budget SUITE_BUDGET_S (default 450 s) over all steps
#   bash benchmarks/gpu_suite.sh --dry-run       # on a CPU: tiny shapes, float32, Triton interpreter (also DRY=1)
#   bash benchmarks/gpu_suite.sh --only kernels,ep   # re-run some steps (the files get an _only-... suffix)
#
# Steps, each its own Python process under `timeout` (a crash or hang costs that step only), in this order:
#   env          versions, packages, where moebalance imports from; copy bandwidth and dense matmul ceilings
#   kernels      Triton forward/backward vs dense matmul (yardstick) and the per-expert loop (baseline)
#   layer        MoELayer with each balancer (none, aux_loss, loss_free, bip), triton and torch back-ends
#   bip          the bip balancer's step on the device over a stream of batches (benchmarks/bip_balancer.py;
#                its certified gap needs numba or OR-Tools, without them step time and loads only)
#   calibration  the simulator's cost model measured (GEMM time vs rows, weight copies), simulator re-run
#   ep           ExpertParallelMoE with world size 1 on NCCL (gloo in a dry run)
#   pytest       the gpu-marked tests (pytest -m gpu)
# After every step benchmarks/gpu_report.py merges what exists into
#   $OUT/gpu_suite_<device>.json and .md (OUT unset: benchmarks/results/), and the full log goes to
#   gpu_suite_<device>.log beside them: three files, so the device tool brings all of them back.
#
# Imports: benchmarks/gpu_bootstrap.py is linked as sitecustomize.py into a temporary folder on PYTHONPATH, which
# maps moebalance.{solvers,kernels,integrations} onto the checkout's folders as pyproject.toml says (no pip).
# A dry run also hides ortools, cvxpy and highspy (GPU_SUITE_BLOCK), which the GPU machine lacks.
# Environment: PYTHON (default: .venv/bin/python if present, else python3), OUT, SUITE_BUDGET_S, DRY.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=${DRY:-0}
ONLY=""
OUTDIR=${OUT:-}
STEPS_ALL="env kernels layer bip calibration ep pytest"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) shift; ONLY=${1:-} ;;
    --only=*) ONLY=${1#--only=} ;;
    --out-dir) shift; OUTDIR=${1:-} ;;
    --out-dir=*) OUTDIR=${1#--out-dir=} ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in ${ONLY//,/ }; do
  case " $STEPS_ALL " in *" $s "*) ;; *) echo "gpu_suite.sh: unknown step '$s' in --only (steps: $STEPS_ALL)" >&2; exit 2 ;; esac
done
[ "$DRY" = "true" ] && DRY=1
[ -z "$OUTDIR" ] && OUTDIR=$ROOT/benchmarks/results
mkdir -p "$OUTDIR"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/boot"
ln -s "$ROOT/benchmarks/gpu_bootstrap.py" "$WORK/boot/sitecustomize.py"
export PYTHONPATH="$WORK/boot${PYTHONPATH:+:$PYTHONPATH}"
export MOEBALANCE_CHECKOUT=$ROOT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TQDM_DISABLE=1

if [ "$DRY" = 1 ]; then
  export GPU_SUITE_DRY=1 TRITON_INTERPRET=1 GPU_SUITE_BLOCK=${GPU_SUITE_BLOCK-ortools,cvxpy,highspy}
  SLUG=dry-run-cpu
  BUDGET=${SUITE_BUDGET_S:-900}
  DRYFLAG=--dry-run
  declare -A LIMIT=([env]=120 [kernels]=300 [layer]=300 [bip]=300 [calibration]=300 [ep]=300 [pytest]=300)
else
  unset TRITON_INTERPRET GPU_SUITE_DRY
  export GPU_SUITE_BLOCK=${GPU_SUITE_BLOCK-}
  NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  [ -z "$NAME" ] && NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null)
  [ -z "$NAME" ] && { echo "gpu_suite.sh: no CUDA device found; use --dry-run on a CPU" >&2; exit 2; }
  SLUG=$(printf '%s' "$NAME" | tr 'A-Z' 'a-z' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//' | cut -c1-40)
  BUDGET=${SUITE_BUDGET_S:-450}
  DRYFLAG=
  declare -A LIMIT=([env]=60 [kernels]=200 [layer]=90 [bip]=60 [calibration]=120 [ep]=90 [pytest]=150)
fi
SUFFIX=""
[ -n "$ONLY" ] && SUFFIX="_only-${ONLY//,/-}"
LOG="$OUTDIR/gpu_suite_${SLUG}${SUFFIX}.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

now() { date +%s.%N; }
if command -v timeout > /dev/null; then TIMEOUT=(timeout --signal=INT --kill-after=15)
else TIMEOUT=(); echo "gpu_suite: coreutils' timeout not found: steps run without their own limits"; fi
START=$(now)
echo "gpu_suite: $(date -u +%FT%TZ) root=$ROOT python=$PY dry=$DRY device=$SLUG budget=${BUDGET}s out=$OUTDIR"
FAILED=0

report() {
  "$PY" "$ROOT/benchmarks/gpu_report.py" --work "$WORK" --out-dir "$OUTDIR" --slug "$SLUG" --suffix "$SUFFIX" \
    $DRYFLAG || echo "gpu_suite: report failed"
}

step() {  # step NAME COMMAND...
  local name=$1; shift
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  local left limit t0 rc wall
  left=$(awk -v b="$BUDGET" -v s="$START" -v n="$(now)" 'BEGIN { printf "%d", b - (n - s) }')
  limit=${LIMIT[$name]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "=== [$name] skipped: ${left}s left of the ${BUDGET}s budget"
    printf '{"name": "%s", "rc": null, "wall_s": 0, "timeout_s": 0, "skipped": "budget"}\n' "$name" >> "$WORK/steps.jsonl"
    FAILED=1
    report
    return
  fi
  echo "=== [$name] (timeout ${limit}s) $*"
  t0=$(now)
  if [ ${#TIMEOUT[@]} -gt 0 ]; then "${TIMEOUT[@]}" "$limit" "$@"; else "$@"; fi
  rc=$?
  wall=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  [ "$rc" = 124 ] && echo "=== [$name] TIMED OUT after ${limit}s"
  echo "=== [$name] rc=$rc wall=${wall}s"
  printf '{"name": "%s", "rc": %d, "wall_s": %s, "timeout_s": %d}\n' "$name" "$rc" "$wall" "$limit" >> "$WORK/steps.jsonl"
  [ "$rc" != 0 ] && FAILED=1
  report
}

cd "$ROOT" || exit 2
B=$ROOT/benchmarks
step env "$PY" "$B/gpu_env.py" $DRYFLAG --out "$WORK/env.json"
step kernels "$PY" "$B/gpu_kernels.py" $DRYFLAG --out "$WORK/kernels.json"
step layer "$PY" "$B/gpu_layer.py" $DRYFLAG --out "$WORK/layer.json"
if [ "$DRY" = 1 ]; then BIPDEV=cpu; else BIPDEV=cuda; fi
step bip "$PY" "$B/bip_balancer.py" --device $BIPDEV $DRYFLAG --out "$WORK/bip.json"
step calibration "$PY" "$B/gpu_calibrate.py" $DRYFLAG --out "$WORK/calibration.json"
step ep "$PY" "$B/gpu_ep.py" $DRYFLAG --out "$WORK/ep.json"
# the test files that hold gpu-marked tests (collecting only these keeps unrelated imports out)
GPU_TESTS=$(grep -rl --include="test_*.py" "pytest.mark.gpu" tests 2>/dev/null | sort | tr '\n' ' ')
if [ -n "$GPU_TESTS" ]; then
  step pytest "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$WORK/pytest.xml" $GPU_TESTS
else
  echo "=== [pytest] no gpu-marked tests found under tests/"
fi
TOTAL=$(awk -v s="$START" -v n="$(now)" 'BEGIN { printf "%.1f", n - s }')
echo "gpu_suite: done in ${TOTAL}s; results: $OUTDIR/gpu_suite_${SLUG}${SUFFIX}.{json,md,log}"
[ -f "$OUTDIR/gpu_suite_${SLUG}${SUFFIX}.md" ] && sed -n '/^## Targets/,/^## Ceil/p' "$OUTDIR/gpu_suite_${SLUG}${SUFFIX}.md" | head -n 30
exit $FAILED
