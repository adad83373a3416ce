#!/usr/bin/env bash
# The first-GPU check of issue 29, in one run of under 8 minutes (BUDGET_S, default 450 s, plus at most 10 s per
# stage to kill one that overran), each stage with its own timeout so that one hang cannot eat the rest.
# Results (JSON) and logs go to OUT.
#
#   bash bench/gpu_check.sh [OUT]             OUT: this argument, else $OUT, else ./gpu_check_out
#   bash bench/gpu_check.sh --dry-run [OUT]   anywhere, no GPU needed: imports, arguments, test collection
#
# Stages (expected time on an H100/H200, limit):
#   versions   python, torch, triton, CUDA, the GPU, other modules            ~10 s,  30 s
#   then, side by side (none of them times anything):
#   patterns   fwd+bwd per pattern vs the reference: bf16, fp32 ieee/tf32x3   ~60 s, 150 s
#   resources  registers, spills, shared memory, warps, stages, wgmma         ~40 s, 150 s
#   pytest     python3 -m pytest -n 8 tests/test_attention.py tests/test_blocksparse.py on CUDA ~100 s, 150 s
#   then, one at a time on an idle GPU:
#   attention  bench.attention --gpu-only: ours vs SDPA flash vs Flex         ~120 s, 150 s
#   train      bench.train --gpu-only: the paper's ImageNet-64 config, MFU    ~45 s,  70 s
#   big        fwd+bwd at N=65,536, H=16, D=128; B=32 int64-offset forward    ~30 s,  60 s
#   summary    one table of every stage                                       ~2 s
#   tune       optional (STAGES="tune"): each pass alone with the table's config and its neighbours, timed,
#              blocks 64 and 128, D 64 and 128, N 16,384                      ~120 s, 240 s
#   blocksparse optional (STAGES="blocksparse"): bench.blocksparse --gpu-only, block-sparse weights (issue 26)
#              in bf16, ours vs cuBLAS and torch's Triton BSR, blocks 32 and 64 ~60 s, 150 s
# Environment: PYTHON (default python3), STAGES (a space-separated subset, in any order; they run in the order
# above), BUDGET_S, GPU_NS (bench.attention's lengths, default 16384,65536,3072,12288: targets first).
# Each stage writes OUT/run_<stage>.json (status, exit code, seconds, limit) and OUT/<stage>.log; the python
# stages also write OUT/<stage>.json; pytest writes OUT/pytest.xml; attention and train write OUT/<stage>.json.
set -u
cd "$(dirname "$0")/.." || exit 2

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-450}"
STAGES="${STAGES:-versions patterns resources pytest attention train big summary}"
GPU_NS="${GPU_NS:-16384,65536,3072,12288}"
START=$(date +%s)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels on CUDA tensors (kernels/triton_attention.py decides at import)
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)

selected() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

record() {  # name status rc seconds limit note
  local tmp="$OUT_DIR/.run_$1.json.tmp"
  printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s, "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" > "$tmp" && mv "$tmp" "$OUT_DIR/run_$1.json"
}

run_stage() {  # name max_seconds reserve_seconds command...: run it within min(max, time left - reserve)
  local name=$1 max=$2 reserve=$3
  shift 3
  if ! selected "$name"; then return 0; fi
  local left limit t0 rc secs status
  left=$((BUDGET_S - ($(date +%s) - START) - reserve))
  limit=$((max < left ? max : left))
  if [ "$limit" -lt 15 ]; then
    echo "== [$name] skipped: out of time (${left}s left after the later stages' share)"
    record "$name" skipped 0 0 "$limit" "out of time"
    return 0
  fi
  t0=$(date +%s)
  echo "== [$name] started (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$secs" "$limit" ""
  echo "== [$name] $status (exit $rc) in ${secs}s; last lines of $OUT_DIR/$name.log:"
  tail -n 30 "$OUT_DIR/$name.log" | cut -c1-240
  return 0
}

last_json_line() {  # log -> json: the benchmark's last line, if it is JSON
  local tmp="$2.tmp"
  tail -n 1 "$1" > "$tmp" 2>/dev/null &&
    "$PY" -c 'import json, sys; json.load(open(sys.argv[1]))' "$tmp" 2>/dev/null && mv "$tmp" "$2"
  rm -f "$tmp"
}

echo "GPU check -> $OUT_DIR (budget ${BUDGET_S}s, stages: $STAGES$([ "$DRY" = 1 ] && echo ', dry run'))"

# 1. versions
run_stage versions 30 420 "$PY" -m bench.gpu_check versions --out "$OUT_DIR" ${DRYFLAG[@]+"${DRYFLAG[@]}"}

# 2. checks that time nothing, side by side (pytest's 8 workers and the two stages share the GPU and the CPUs)
if [ "$DRY" = 1 ]; then
  PYTEST=("$PY" -m pytest tests/test_attention.py tests/test_blocksparse.py --collect-only -q -p no:cacheprovider)
else
  PYTEST=("$PY" -m pytest -n 8 tests/test_attention.py tests/test_blocksparse.py -q -p no:cacheprovider
          --junitxml="$OUT_DIR/pytest.xml")
fi
run_stage patterns 150 280 "$PY" -m bench.gpu_check patterns --out "$OUT_DIR" ${DRYFLAG[@]+"${DRYFLAG[@]}"} &
run_stage resources 150 280 "$PY" -m bench.gpu_check resources --out "$OUT_DIR" ${DRYFLAG[@]+"${DRYFLAG[@]}"} &
run_stage pytest 150 280 "${PYTEST[@]}" &
wait

# 3. timings, one at a time
if [ "$DRY" = 1 ]; then
  run_stage attention 150 130 "$PY" -c "import bench.attention as a; a.parse_args(['--gpu-only', '--gpu-ns', '$GPU_NS']); \
print('bench.attention: imports and arguments ok; GPU rows not run (dry run)')"
  run_stage train 70 60 "$PY" -c "import bench.train; print('bench.train: imports ok; GPU row not run (dry run)')"
else
  run_stage attention 150 130 "$PY" -m bench.attention --gpu-only --gpu-ns "$GPU_NS" \
    --json-out "$OUT_DIR/attention.json"
  run_stage train 70 60 "$PY" -m bench.train --gpu-only --repeats 2
  selected train && last_json_line "$OUT_DIR/train.log" "$OUT_DIR/train.json"
fi

# 4. the largest problem last: if it takes the machine down, everything else is already written
run_stage big 60 0 "$PY" -m bench.gpu_check big --out "$OUT_DIR" ${DRYFLAG[@]+"${DRYFLAG[@]}"}

# optional: not in the default STAGES
if [ "$DRY" = 1 ]; then
  run_stage blocksparse 150 0 "$PY" -c "import bench.blocksparse; print('bench.blocksparse: imports ok (dry run)')"
else
  run_stage blocksparse 150 0 "$PY" -m bench.blocksparse --gpu-only --features 4096,12288 --tokens 32,256 \
    --blocks 32,64
  selected blocksparse && last_json_line "$OUT_DIR/blocksparse.log" "$OUT_DIR/blocksparse.json"
fi
run_stage tune 240 0 "$PY" -m bench.gpu_check tune --out "$OUT_DIR" --blocks 64,128 --dims 64,128 \
  ${DRYFLAG[@]+"${DRYFLAG[@]}"}

if selected summary; then
  "$PY" -m bench.gpu_check summary --out "$OUT_DIR" > "$OUT_DIR/summary.log" 2>&1
  cat "$OUT_DIR/summary.log"
fi
echo "GPU check done in $(($(date +%s) - START))s -> $OUT_DIR"
