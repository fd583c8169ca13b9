#!/usr/bin/env bash
# GPU smoke test: every CUDA path cdft has, in one prepared script, for a lent GPU machine.
#
#   bash benchmarks/gpu_smoke.sh [OUT_DIR]        # default: $OUT if set, else /tmp/cdft-gpu-smoke
#
# What it runs (random weights, synthetic BreakHis-layout data; nothing is downloaded):
#   1. each built-in strategy (linear, full, frt, staged) on CUDA in bf16 and in fp16
#      (grad scaler), with a ViT and a ConvNeXt, a few steps each, then `cdft eval` of
#      the saved checkpoint, which must reproduce the run's summary;
#   2. a BatchNorm backbone (test_resnet) with --sync-batchnorm through torchrun (nccl);
#   3. the GPU benchmarks (benchmarks/*.py with --device cuda, --json), when present.
# Every step's output goes to OUT_DIR/logs/<step>.log; a table of pass/fail and seconds is
# printed at the end and written to OUT_DIR/smoke.json. The script continues past a
# failing step so one run shows every broken path; its exit status is the number of
# failed steps (0: all passed).
set -u -o pipefail

OUT_DIR="${1:-${OUT:-/tmp/cdft-gpu-smoke}}"
# a CPU dry run of the script's plumbing: SMOKE_DEVICE=cpu SMOKE_PRECISIONS=fp32 SMOKE_BACKBONES=test_vit
DEVICE="${SMOKE_DEVICE:-cuda}"
PRECISIONS="${SMOKE_PRECISIONS:-bf16 fp16}"
BACKBONES="${SMOKE_BACKBONES:-test_vit test_convnext}"
PY="${PYTHON:-python}"
mkdir -p "$OUT_DIR/logs"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

if ! "$PY" -c "import cdft_core" 2>/dev/null; then
  "$PY" -m pip install -q -e '.[dev]' >"$OUT_DIR/logs/install.log" 2>&1 || { echo "install failed"; exit 1; }
fi
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" \
    || { echo "gpu_smoke: no CUDA device; nothing to do"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT_DIR/gpu.csv" 2>/dev/null || true

RESULTS=()
FAILED=0
step() {  # step NAME COMMAND...: run, time, record
  local name="$1"; shift
  local start end status
  start=$(date +%s.%N)
  "$@" >"$OUT_DIR/logs/$name.log" 2>&1
  status=$?
  end=$(date +%s.%N)
  local secs
  secs=$(awk "BEGIN {printf \"%.1f\", $end - $start}")
  if [ "$status" -eq 0 ]; then RESULTS+=("$name pass $secs"); else RESULTS+=("$name FAIL($status) $secs"); FAILED=$((FAILED + 1)); fi
  printf '%-40s %-10s %6ss\n' "$name" "$([ "$status" -eq 0 ] && echo pass || echo "FAIL($status)")" "$secs"
}

DATA="$OUT_DIR/data"
"$PY" -m cdft_cli make-synthetic breakhis "$DATA" --seed 0 >/dev/null
ROOT="$DATA/BreaKHis_v1"
SPLIT="$OUT_DIR/breakhis.csv"
"$PY" -m cdft_cli prepare breakhis "$ROOT" --folds 3 -o "$SPLIT" >"$OUT_DIR/logs/prepare.log" 2>&1

run_and_eval() {  # run_and_eval RUN_DIR cdft-run-options...: a run, then eval of its checkpoint == summary
  local run_dir="$1"; shift
  "$PY" -m cdft_cli run --dataset breakhis --data-root "$ROOT" --split-file "$SPLIT" --val-fold 0 --test-fold 1 \
    --no-pretrained --device "$DEVICE" --epochs 2 --max-steps-per-epoch 5 --batch-size 16 --output "$run_dir" "$@" || return 1
  "$PY" - "$run_dir" <<'EOF' || return 1
import json, subprocess, sys
run_dir = sys.argv[1]
summary = json.load(open(f"{run_dir}/summary.json"))
out = subprocess.run([sys.executable, "-m", "cdft_cli", "eval", run_dir, "--split", "test", "--json"],
                     check=True, capture_output=True, text=True).stdout
evaluated = json.loads(out)
want, got = summary["test"], evaluated["metrics"]
print("summary test accuracy", want["accuracy"], "loss", want["loss"], "| eval", got["accuracy"], got["loss"])
assert want["accuracy"] == got["accuracy"], (want["accuracy"], got["accuracy"])
assert abs(want["loss"] - got["loss"]) <= 1e-3 * max(1.0, abs(want["loss"])), (want["loss"], got["loss"])
EOF
}

for backbone in $BACKBONES; do
  for strategy in linear full frt staged; do
    for precision in $PRECISIONS; do
      step "$backbone-$strategy-$precision" run_and_eval "$OUT_DIR/runs/$backbone-$strategy-$precision" \
        --backbone "$backbone" --strategy "$strategy" --precision "$precision" --image-size 64
    done
  done
done

if [ "$DEVICE" = cuda ]; then
# a larger ViT at the paper's input size, bf16, staged: the realistic memory path
step "vit_base-staged-bf16-224" run_and_eval "$OUT_DIR/runs/vit_base-staged" \
  --backbone vit_base_patch16_224 --strategy staged --precision bf16 --batch-size 32

# BatchNorm + DDP through torchrun with nccl (one GPU: one process; sync-batchnorm conversion path)
step "resnet-full-syncbn-torchrun" run_and_eval "$OUT_DIR/runs/resnet-syncbn" \
  --backbone test_resnet --strategy full --precision bf16 --image-size 64 --sync-batchnorm --nproc-per-node 1

for bench in benchmarks/*.py; do
  name="bench-$(basename "$bench" .py)"
  step "$name" "$PY" "$bench" --device cuda --json
  cp "$OUT_DIR/logs/$name.log" "$OUT_DIR/$name.json" 2>/dev/null || true
done
fi

"$PY" - "$OUT_DIR" "${RESULTS[@]}" <<'EOF'
import json, sys
out_dir, rows = sys.argv[1], sys.argv[2:]
table = [dict(zip(("step", "status", "seconds"), row.split(" "))) for row in rows]
json.dump(table, open(f"{out_dir}/smoke.json", "w"), indent=1)
EOF
echo "gpu_smoke: $FAILED failed step(s); logs in $OUT_DIR/logs, table in $OUT_DIR/smoke.json"
exit "$FAILED"
