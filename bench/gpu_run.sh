#!/usr/bin/env bash
# The one prepared GPU run (issue 16), from the repository root of a carried working tree:
#   bench/gpu_run.sh [OUT]            OUT defaults to $OUT (the device tool's) or ./gpu-results
# 1. installs what is missing, offline: the wheels in $WHEELS (default ./wheels, see docs/kernels.md
#    "Carrying the GPU run") with --no-deps, then this checkout in editable mode; the machine's own
#    torch and triton are used as they are.
# 2. runs `lessserve bench gpu`: probe, roofline plan, AOT compiles, native gpu tests, bench kernels,
#    decode and serve on random weights of 7B / 8B / default shapes, each stage in its own time limit,
#    all within $BUDGET_S (480 s). Without a CUDA GPU it says so and exits 0 after the CPU-side stages.
#    $STAGES (comma-separated) narrows the stages.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-results}}
PY=${PY:-python3}
WHEELS=${WHEELS:-wheels}
BUDGET_S=${BUDGET_S:-480}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT_DIR"
t0=$(date +%s)

if ! "$PY" -c "import lessserve.bench.gpu_run" 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_run: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS (offline, no deps)"
    "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || echo "gpu_run: some wheels did not install"
  fi
  echo "gpu_run: installing this checkout (editable, offline)"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || { echo "gpu_run: cannot install lessserve here; see docs/kernels.md"; exit 1; }
fi
"$PY" - <<'EOF' || { echo "gpu_run: imports missing (carry their wheels)"; exit 1; }
import importlib.util
missing = [m for m in ("torch", "triton", "pydantic", "pydantic_settings", "safetensors", "redis")
           if importlib.util.find_spec(m) is None]
print("gpu_run: python modules missing:", ", ".join(missing) if missing else "none")
raise SystemExit(1 if missing else 0)
EOF
left=$(( BUDGET_S - ($(date +%s) - t0) ))
"$PY" -m lessserve.cli.main bench gpu --out "$OUT_DIR" --budget-s "$left" ${STAGES:+--stages "$STAGES"}
rc=$?
echo "gpu_run: done in $(( $(date +%s) - t0 ))s, rc $rc; results in $OUT_DIR"
exit $rc
