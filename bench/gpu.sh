#!/usr/bin/env bash
# The GPU benchmark kit's one command (issue 8). On a box with CUDA PyTorch and the packages of
# bench/gpu-kit-baseline.txt but no NeMo and no network: install the kit (make gpu-kit) offline,
# build the real-size random models, check the device against the CPU fp64 reference
# (bench/gpu_check.py), run the engine benchmark at each N in bf16, and write JSON + markdown
# to $OUT. Aimed at <= 9 minutes on one H100/H200. Proven on a CPU with:
#   bench/gpu.sh --device cpu --size tiny --calls 2,4
set -uo pipefail
DEVICE=cuda SIZE=real CALLS=64,256,512,1024 DTYPE=bf16 CHECK_DTYPES=fp32,bf16 STEPS=10
CALL_SEC=60 PUSH_MS=20 KIT=${KIT:-gpu-kit} OUT=${OUT:-gpu-out} PY=${PY:-python3}
usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; echo "options: --device D --size tiny|real --calls N,N --dtype D --check-dtypes D,D --steps S --call-sec S --push-ms MS --kit DIR --out DIR --python PY"; }
while (($#)); do
  case $1 in
    --device) DEVICE=$2; shift 2 ;; --size) SIZE=$2; shift 2 ;; --calls) CALLS=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;; --check-dtypes) CHECK_DTYPES=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;; --call-sec) CALL_SEC=$2; shift 2 ;; --push-ms) PUSH_MS=$2; shift 2 ;;
    --kit) KIT=$2; shift 2 ;; --out) OUT=$2; shift 2 ;; --python) PY=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;; *) echo "gpu.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu-run.log"
started=$SECONDS
say() { echo "[gpu.sh $((SECONDS - started)) s] $*" | tee -a "$LOG" >&2; }
say "device $DEVICE, size $SIZE, calls $CALLS, dtype $DTYPE; load: $(uptime)"

# 1. The kit, offline, unless NeMo is already importable.
if ! "$PY" -c 'import nemo' 2>/dev/null; then
  missing=$("$PY" - <<'PYEOF'
import importlib.metadata as md
names = [l.strip() for l in open("bench/gpu-kit-baseline.txt") if l.strip() and not l.startswith("#")]
missing = []
for n in names:
    try:
        md.version(n)
    except md.PackageNotFoundError:
        missing.append(n)
print(" ".join(missing))
PYEOF
)
  [ -z "$missing" ] || { say "the image lacks baseline packages the kit does not carry: $missing"; exit 2; }
  [ -d "$KIT/wheels" ] || { say "no $KIT/wheels: run 'make gpu-kit' where there is a network"; exit 2; }
  SITE=${TMPDIR:-/tmp}/callscribe-gpu-kit
  say "installing the kit from $KIT/wheels into $SITE (offline)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$KIT/wheels" \
    --target "$SITE" -r bench/gpu-kit.txt 2>&1 | tee -a "$LOG" || { say "kit install failed"; exit 2; }
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
AUDIO=()
[ -d "$KIT/audio" ] && AUDIO=(--audio "$KIT/audio")

# 2. Models (cached across runs in the cache dir).
say "building the $SIZE random models"
"$PY" -c "from pathlib import Path; from worker.engine.models import build_random_models; print(build_random_models('$SIZE', Path.home() / '.cache/callscribe/models'))" 2>&1 | grep -v '^\[NeMo' | tee -a "$LOG"

# 3. Correctness against CPU fp64.
say "checking $DEVICE ($CHECK_DTYPES) against CPU fp64"
"$PY" -m bench.gpu_check --size "$SIZE" --device "$DEVICE" --dtypes "$CHECK_DTYPES" \
  "${AUDIO[@]}" --json "$OUT/check.json" 2>&1 | grep --line-buffered -v '^\[NeMo\|^ ' | tee -a "$LOG"
check=${PIPESTATUS[0]}
say "check exit code $check (0 ok, 1 below a floor, 2 a dtype could not run)"

# 4. The engine benchmark; bf16 falls back to fp32, said so, while the engine lacks it.
run_dtype=$DTYPE
if ! "$PY" -c "import sys; from bench.engine import engine_dtypes; sys.exit('$DTYPE' not in engine_dtypes())"; then
  say "the engine has no $DTYPE yet: benchmarking fp32 instead"
  run_dtype=fp32
fi
say "engine benchmark: N = $CALLS, $run_dtype"
"$PY" -m bench engine --size "$SIZE" --device "$DEVICE" --dtype "$run_dtype" --calls "$CALLS" \
  --steps "$STEPS" --call-sec "$CALL_SEC" --push-ms "$PUSH_MS" --no-sequential "${AUDIO[@]}" \
  --json "$OUT/engine-$run_dtype.json" --markdown "$OUT/engine.md" 2>&1 \
  | grep --line-buffered -v '^\[NeMo' | tee -a "$LOG"
bench=${PIPESTATUS[0]}
say "done in $((SECONDS - started)) s; load: $(uptime); results in $OUT"
exit $(( bench != 0 ? bench : check ))
