#!/usr/bin/env bash
# GPU smoke test: every CUDA path cdft has, in one prepared script, for a lent GPU machine.
#
#   bash benchmarks/gpu_smoke.sh [OUT_DIR]        # default: $OUT if set, else /tmp/cdft-gpu-smoke
#
# What it runs (random weights, synthetic BreakHis-layout data; nothing is downloaded):
#   1. each built-in strategy (linear, full, frt, staged, lora, staged-lora) on CUDA in bf16 and in fp16
#      (grad scaler), with a ViT and a ConvNeXt, a few steps each, then `cdft eval` of
#      the saved checkpoint, which must reproduce the run's summary;
#   2. the GPU step (cdft_core/training/speed.py): each backbone with --compile (torch.compile)
#      in the first precision, test_vit with --compile-mode reduce-overhead (CUDA graphs), and a resume of a run interrupted (SIGTERM) mid-epoch with
#      persistent loader workers, fused Adam and, for the ConvNeXt, channels_last;
#   3. a BatchNorm backbone (test_resnet) with --sync-batchnorm through torchrun (nccl);
#   4. the GPU benchmarks (benchmarks/*.py with --device cuda, --json), when present;
#      train_step.py within a time budget (SMOKE_BENCH_BUDGET seconds, default 300); then the
#      MFU sweep: ViT-B/16 full at batch 256 and 128 compiled in inductor's modes (SMOKE_MFU_BUDGET, 240).
# Every step's output goes to OUT_DIR/logs/<step>.log; a table of pass/fail and seconds is
# printed at the end and written to OUT_DIR/smoke.json (each benchmark's stdout, its JSON, to
# OUT_DIR/bench-<name>.json). The script continues past a failing step so one run shows every
# broken path; its exit status is the number of failed steps (0: all passed; at most 125; a step
# that recorded no status counts as failed), 2 when OUT_DIR cannot be used.
set -u -o pipefail

OUT_DIR="${1:-${OUT:-/tmp/cdft-gpu-smoke}}"
# a CPU dry run of the script's plumbing: SMOKE_DEVICE=cpu SMOKE_PRECISIONS=fp32 SMOKE_BACKBONES=test_vit
# a shorter CUDA run: SMOKE_STRATEGIES=full SMOKE_LARGE=0 (no ViT-B staged, torchrun or benchmarks)
# two calls that each fit a 10-minute command: SMOKE_ONLY=checks, then SMOKE_ONLY=benchmarks
DEVICE="${SMOKE_DEVICE:-cuda}"
PRECISIONS="${SMOKE_PRECISIONS:-bf16 fp16}"
BACKBONES="${SMOKE_BACKBONES:-test_vit test_convnext}"
STRATEGIES="${SMOKE_STRATEGIES:-linear full frt staged lora staged-lora}"
LARGE="${SMOKE_LARGE:-1}"
ONLY="${SMOKE_ONLY:-all}"  # checks (runs and evals), benchmarks (timings alone), or all
case "$ONLY" in all|checks|benchmarks) ;; *) echo "SMOKE_ONLY must be all, checks or benchmarks"; exit 2;; esac
BENCH_BUDGET="${SMOKE_BENCH_BUDGET:-300}"
# checks of results run SMOKE_JOBS at a time (the tiny runs leave a GPU and 16 cores mostly idle); benchmarks alone
JOBS="${SMOKE_JOBS:-$([ "$DEVICE" = cuda ] && echo 4 || echo 1)}"
MFU_BUDGET="${SMOKE_MFU_BUDGET:-240}"
PY="${PYTHON:-python}"
# relative paths would resolve from the repo root after the `cd` below: a second folder, a missing python
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR";; esac
case "$PY" in /*|"") ;; */*) PY="$PWD/$PY";; esac
if [ -e "$OUT_DIR" ] && [ ! -d "$OUT_DIR" ]; then
  echo "gpu_smoke: $OUT_DIR is not a folder; choose an empty or new folder"; exit 2
fi
# OUT_DIR is empty or an earlier smoke run's (marked): a rerun there starts clean, since earlier
# runs would refuse --output; any other folder is left alone
if [ -d "$OUT_DIR" ] && [ -n "$(ls -A "$OUT_DIR")" ] && [ ! -e "$OUT_DIR/.cdft-gpu-smoke" ]; then
  echo "gpu_smoke: $OUT_DIR is not empty and not an earlier smoke run's; choose an empty or new folder"; exit 2
fi
# SMOKE_ONLY=benchmarks after a SMOKE_ONLY=checks call keeps the checks' logs and rows (smoke.json lists both)
# everything this script writes, so that no earlier result is read as this call's
if [ "$ONLY" = benchmarks ]; then
  rm -rf "$OUT_DIR"/logs/bench-* "$OUT_DIR"/bench-*.json "$OUT_DIR/smoke.json"
else
  rm -rf "$OUT_DIR/logs" "$OUT_DIR/runs" "$OUT_DIR/data" "$OUT_DIR/status" "$OUT_DIR"/bench-*.json \
    "$OUT_DIR/smoke.json" "$OUT_DIR/breakhis.csv" "$OUT_DIR/gpu.csv"
fi
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/status" 2>/dev/null && touch "$OUT_DIR/.cdft-gpu-smoke" 2>/dev/null \
  || { echo "gpu_smoke: cannot write in $OUT_DIR; choose a writable empty or new folder"; exit 2; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || { echo "gpu_smoke: cannot enter the repository root"; exit 2; }

if ! "$PY" -c "import cdft_cli" 2>/dev/null; then
  # offline GPU machines have the dependencies but no package index: then install cdft alone
  "$PY" -m pip install -q -e '.[dev]' >"$OUT_DIR/logs/install.log" 2>&1 \
    || "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT_DIR/logs/install.log" 2>&1 \
    || { echo "install failed"; exit 1; }
fi
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" \
    || { echo "gpu_smoke: no CUDA device; nothing to do"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT_DIR/gpu.csv" 2>/dev/null || true

STATUS_DIR="$OUT_DIR/status"  # made above, with logs/
SEQ=0  # a benchmarks call after a checks call: keep theirs, number after the highest
for old in "$STATUS_DIR"/*; do
  [ -e "$old" ] || continue
  case "$(cat "$old")" in bench-*) rm -f "$old"; continue;; esac
  case "$(basename "$old")" in *[!0-9]*) continue;; esac
  [ "$((10#$(basename "$old")))" -gt "$SEQ" ] && SEQ=$((10#$(basename "$old")))
done
FIRST_SEQ=$SEQ
run_step() {  # run_step FILE NAME COMMAND...: run, time, record "NAME STATUS SECONDS" in FILE
  local file="$1" name="$2"; shift 2
  local start end status secs word
  start=$(date +%s.%N)
  "$@" >"$OUT_DIR/logs/$name.log" 2>&1
  status=$?
  end=$(date +%s.%N)
  secs=$(awk "BEGIN {printf \"%.1f\", $end - $start}")
  word=pass; [ "$status" -eq 0 ] || word="FAIL($status)"
  echo "$name $word $secs" >"$file"
  printf '%-48s %-10s %6ss\n' "$name" "$word" "$secs"
}
step() {  # step NAME COMMAND...: alone, after every background step (timings need the machine to themselves)
  wait
  SEQ=$((SEQ + 1)); run_step "$STATUS_DIR/$(printf %03d $SEQ)" "$@"
}
pstep() {  # pstep NAME COMMAND...: in the background, at most $JOBS at once (checks of results, not timings)
  SEQ=$((SEQ + 1))
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  run_step "$STATUS_DIR/$(printf %03d $SEQ)" "$@" &
}
to_file() {  # to_file FILE COMMAND...: the command's stdout alone into FILE (stderr stays in the step's log)
  local file="$1"; shift
  "$@" >"$file.part" || { local status=$?; cat "$file.part"; rm -f "$file.part"; return "$status"; }
  mv "$file.part" "$file"  # only a successful run's stdout becomes FILE: never a half-written JSON
}
record() {  # record NAME STATUS: a step that did not run (a skip)
  SEQ=$((SEQ + 1)); echo "$1 $2 0" >"$STATUS_DIR/$(printf %03d $SEQ)"
}

DATA="$OUT_DIR/data"
ROOT="$DATA/BreaKHis_v1"
SPLIT="$OUT_DIR/breakhis.csv"
if [ "$ONLY" != benchmarks ]; then  # the benchmarks make their own inputs
"$PY" -m cdft_cli make-synthetic breakhis "$DATA" --seed 0 >/dev/null
"$PY" -m cdft_cli prepare breakhis "$ROOT" --folds 3 -o "$SPLIT" >"$OUT_DIR/logs/prepare.log" 2>&1
fi

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

# the LoRA strategies need peft (the lora extra); an offline machine without it says so once instead of failing each step
if [ "$ONLY" != benchmarks ] && ! "$PY" -c "import peft" 2>/dev/null; then
  case " $STRATEGIES " in *lora*)
    echo "gpu_smoke: peft is not installed (pip install 'cdft[lora]'): the lora and staged-lora steps are skipped"
    record lora-strategies "skip(no-peft)"
    STRATEGIES=$(printf '%s\n' $STRATEGIES | grep -v lora | tr '\n' ' ');;
  esac
fi

if [ "$ONLY" != benchmarks ]; then
for backbone in $BACKBONES; do
  for strategy in $STRATEGIES; do
    for precision in $PRECISIONS; do
      pstep "$backbone-$strategy-$precision" run_and_eval "$OUT_DIR/runs/$backbone-$strategy-$precision" \
        --backbone "$backbone" --strategy "$strategy" --precision "$precision" --image-size 64
    done
  done
done

# --compile: compiled runs whose checkpoints cdft eval (eager) reproduces
FIRST_PRECISION="${PRECISIONS%% *}"
for backbone in $BACKBONES; do
  pstep "$backbone-full-$FIRST_PRECISION-compile" run_and_eval "$OUT_DIR/runs/$backbone-full-compile" \
    --backbone "$backbone" --strategy full --precision "$FIRST_PRECISION" --image-size 64 --compile
done
# CUDA graphs (cudagraph trees) through the engine: training, evaluation and the eager cdft eval
pstep "test_vit-full-$FIRST_PRECISION-compile-reduce-overhead" run_and_eval "$OUT_DIR/runs/test_vit-full-cudagraphs" \
  --backbone test_vit --strategy full --precision "$FIRST_PRECISION" --image-size 64 --compile --compile-mode reduce-overhead

resume_matches() {  # resume_matches NAME cdft-run-options...: SIGTERM mid-epoch, resume, same summary as uninterrupted
  local name="$1"; shift
  local base=("$PY" -m cdft_cli run --dataset breakhis --data-root "$ROOT" --split-file "$SPLIT" --val-fold 0
              --test-fold 1 --no-pretrained --device "$DEVICE" --epochs 2 --max-steps-per-epoch 5 --batch-size 4
              --image-size 64 --num-workers 2 "$@")
  "${base[@]}" --output "$OUT_DIR/runs/$name-ref" || return 1
  CDFT_TEST_FAULT="stage=1,epoch=2,step=2,action=sigterm" "${base[@]}" --output "$OUT_DIR/runs/$name"
  [ $? -eq 143 ] || { echo "expected exit 143 (SIGTERM state saved)"; return 1; }
  "$PY" -m cdft_cli run --resume "$OUT_DIR/runs/$name" || return 1
  "$PY" - "$OUT_DIR/runs/$name" "$OUT_DIR/runs/$name-ref" <<'EOF' || return 1
import json, sys
got, want = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
print("resumed test", got["test"]["accuracy"], got["test"]["loss"], "| uninterrupted", want["test"]["accuracy"], want["test"]["loss"])
# CUDA is not bit-reproducible (cuDNN autotuning, atomics): the same predictions, losses within tolerance
assert got["test"]["accuracy"] == want["test"]["accuracy"], (got["test"], want["test"])
assert abs(got["test"]["loss"] - want["test"]["loss"]) <= 2e-2 * max(1.0, abs(want["test"]["loss"])), (got["test"], want["test"])
EOF
}
for backbone in $BACKBONES; do
  pstep "$backbone-full-$FIRST_PRECISION-resume" resume_matches "$backbone-resume" \
    --backbone "$backbone" --strategy full --precision "$FIRST_PRECISION"
done

if [ "$DEVICE" = cuda ] && [ "$LARGE" = 1 ]; then
# a larger ViT at the paper's input size, bf16, staged: the realistic memory path
pstep "vit_base-staged-bf16-224" run_and_eval "$OUT_DIR/runs/vit_base-staged" \
  --backbone vit_base_patch16_224 --strategy staged --precision bf16 --batch-size 32

# BatchNorm + DDP through torchrun with nccl (one GPU: one process; sync-batchnorm conversion path)
pstep "resnet-full-syncbn-torchrun" run_and_eval "$OUT_DIR/runs/resnet-syncbn" \
  --backbone test_resnet --strategy full --precision bf16 --image-size 64 --sync-batchnorm --nproc-per-node 1
fi
fi

if [ "$DEVICE" = cuda ] && [ "$LARGE" = 1 ] && [ "$ONLY" != checks ]; then
for bench in benchmarks/*.py; do
  name="bench-$(basename "$bench" .py)"
  extra=()
  [ "$name" = bench-train_step ] && extra=(--time-budget "$BENCH_BUDGET")
  step "$name" to_file "$OUT_DIR/$name.json" "$PY" "$bench" --device cuda --json "${extra[@]}"
done
# the MFU target (ViT-B/16 full >= 40 % of the bf16 peak): bigger batches and inductor's other modes
step "bench-mfu" to_file "$OUT_DIR/bench-mfu.json" "$PY" benchmarks/train_step.py --device cuda --json \
  --backbones vit_b16 --strategies full --compile on --compile-modes max-autotune,default,max-autotune-no-cudagraphs \
  --batch-sizes 256,128 --time-budget "$MFU_BUDGET"
fi

wait
FAILED=0  # this call's failed steps (smoke.json lists every recorded step): each number it started, in turn
n=$FIRST_SEQ
while [ "$n" -lt "$SEQ" ]; do
  n=$((n + 1)); file="$STATUS_DIR/$(printf %03d "$n")"
  if [ ! -s "$file" ]; then  # its status could not be written: nothing says it passed
    echo "gpu_smoke: step $n recorded no status ($file): counted as failed"; FAILED=$((FAILED + 1))
  elif grep -q " FAIL(" "$file"; then
    FAILED=$((FAILED + 1))
  fi
done
"$PY" - "$OUT_DIR" "$STATUS_DIR" <<'EOF' || { echo "gpu_smoke: could not write $OUT_DIR/smoke.json"; FAILED=$((FAILED + 1)); }
import json, pathlib, sys
out_dir, status_dir = sys.argv[1], pathlib.Path(sys.argv[2])
rows = [path.read_text().split() for path in sorted(status_dir.iterdir())]  # in the order the steps were started
json.dump([dict(zip(("step", "status", "seconds"), row)) for row in rows], open(f"{out_dir}/smoke.json", "w"), indent=1)
EOF
echo "gpu_smoke: $FAILED failed step(s); logs in $OUT_DIR/logs, table in $OUT_DIR/smoke.json"
exit $((FAILED > 125 ? 125 : FAILED))  # 256 failures must not read as 0
