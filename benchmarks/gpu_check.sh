#!/usr/bin/env bash
# Everything owed on a lent GPU (one H200/H100), in two calls:
#   bash benchmarks/gpu_check.sh DATA_DIR            # call 1, at most ~9 minutes (BUDGET 540):
#     `esam-hf reproduce`: ResNet-18 on the complete CIFAR-10, batch 512 bf16 channels_last, 30 epochs, one
#     seed: the recommended mode (esam_ascent) and SAM first, then SGD and the paper's ESAM, so a call cut
#     short still answers the main question. The runs live in .gpu_check/ (git-ignored): a second call on the
#     still-warm machine resumes them from their last epoch checkpoint.
#   bash benchmarks/gpu_check.sh --short DATA_DIR    # call 2, about 4 minutes (BUDGET 240):
#     1. `esam-hf bench` at ResNet-18 batch 512 bf16 and the GPU-bound WRN-28-10 batch 128 bf16 (where SWP's
#        and SDS's FLOP savings should show) for the recommended mode, SAM, SGD and the paper's ESAM;
#     2. `benchmarks/step_speed.py bare`: three profiled bare steps per method and the GPU's busy fraction;
#     3. `benchmarks/run_speed.py profile`: 20 profiled steps inside a real `esam-hf train` (the whole Trainer path);
#     4. `benchmarks/gpu_check_fsdp.py`: ESAMTrainer under the Trainer's FSDP2 against one process without it;
#     5. with what is left: the same `esam-hf train` profile under --torch_compile (what compiling costs and saves).
# Everything is written under $OUT (env.json: device, versions, date; one log and JSON per part; summary.md),
# and summary.md is printed at the end.
#
#   source WHEELS/install.sh WHEELS && pip install --no-deps --no-build-isolation -e .
#   OUT=... bash benchmarks/gpu_check.sh [--short] DATA_DIR   # DATA_DIR: the CIFAR-10 copy (img/label parquet)
#   OUT=... bash benchmarks/gpu_check.sh [--short] --dry-run  # CPU, tiny sizes, a minute or two: checks this script
#
# BUDGET (seconds) bounds the whole call; each part stops at its share. RUNS overrides where the reproduce runs
# live (default .gpu_check/).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
SHORT=0
DATA=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --short) SHORT=1 ;;
    -*) echo "gpu_check.sh: unknown option $arg (use --short, --dry-run, or give the data directory)" >&2; exit 2 ;;
    *) DATA="$arg" ;;
  esac
done
OUT="${OUT:-benchmarks/results/gpu_check}"
BUDGET="${BUDGET:-$([ "$SHORT" = 1 ] && echo 240 || echo 540)}"
START=$(date +%s)
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
METHODS=esam_ascent,sam,sgd,esam  # the recommended mode and SAM first

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

if [ "$DRY" = 1 ]; then
  DATA="${DATA:-cifar10-subset}"
  BENCH=(--settings 0 --methods "$METHODS" --steps 2 --warmup 1 --repeats 1)
  PROFILE=(--batch 8 --repeats 1 --steps 1)
  TRAIN=(--recipe demo --max_steps 6 --max_train_samples 64 --max_eval_samples 32 --save_strategy no
         --eval_strategy no --dataloader_num_workers 0)
  TRACE=(--skip 2 --steps 3)
  REPRO=(--recipe demo --methods esam_ascent,sgd --seeds 0 --num_train_epochs 1 --max_train_samples 64
         --max_eval_samples 32 --per_device_eval_batch_size 32 --dataloader_num_workers 0 --no_plots)
  RUNS="${RUNS:-.gpu_check/dry-run}"
else
  if [ -z "$DATA" ] || [ ! -e "$DATA" ]; then
    echo "gpu_check.sh: give the CIFAR-10 data directory (e.g. WHEELS/../cifar10-jpeg), got '${DATA}'" >&2; exit 2
  fi
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check.sh: no GPU here; use --dry-run on a CPU" >&2; exit 2; }
  BENCH=(--settings 1,2 --methods "$METHODS" --steps 60 --warmup 10 --repeats 2)
  PROFILE=(--batch 512 --bf16 --channels_last)
  TRAIN=(--recipe cifar10-resnet18 --per_device_train_batch_size 512 --learning_rate 0.2 --bf16
         --channels_last --max_steps 40 --save_strategy no --eval_strategy no --dataloader_num_workers 8
         --esam_selection ascent)
  TRACE=(--skip 15 --steps 20)
  REPRO=(--recipe cifar10-resnet18 --methods "$METHODS" --seeds 0 --num_train_epochs 30
         --batch_size 512 --bf16 --channels_last --per_device_eval_batch_size 1024 --dataloader_num_workers 8
         --save_total_limit 1)
  RUNS="${RUNS:-.gpu_check/reproduce}"
fi

python3 - "$OUT/env.json" "$DRY" <<'PY'
import json, platform, sys, time
import torch, transformers, timm
env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "python": platform.python_version(),
       "torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__,
       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "dry_run": sys.argv[2] == "1"}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
PY

part() {  # part NAME SHARE_SECONDS command...: run with a time limit; a part cut short does not stop the others
  local name="$1" limit="$2"; shift 2
  if [ "$limit" -le 5 ]; then echo "[gpu_check] $name: skipped (budget spent)" | tee -a "$OUT/summary.md"; return; fi
  echo "[gpu_check] $name (at most ${limit}s)"
  local rc=0
  timeout --signal=INT --kill-after=30 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "[gpu_check] $name: exit $rc$([ $rc = 124 ] && echo ' (time share spent: cut short)')" | tee -a "$OUT/summary.md"
}

echo "# gpu_check $(date +%F) on $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["device"])' "$OUT/env.json")" > "$OUT/summary.md"

if [ "$SHORT" = 1 ]; then
  part bench $(( $(left) * 35 / 100 )) esam-hf bench "${BENCH[@]}" --dataset "$DATA" --output_dir "$OUT/bench"
  part profile $(( $(left) * 20 / 100 )) python3 benchmarks/step_speed.py bare "${PROFILE[@]}" --json "$OUT/profile.json"
  part train_profile $(( $(left) * 30 / 100 )) python3 benchmarks/run_speed.py profile --out "$OUT/train_profile" "${TRACE[@]}" \
    -- "${TRAIN[@]}" --dataset "$DATA" --output_dir "$OUT/train_profile/run"
  part fsdp2 60 python3 benchmarks/gpu_check_fsdp.py --out "$OUT/fsdp2" $([ "$DRY" = 1 ] && echo --dry-run)
  part compiled_profile $(( $(left) - 10 )) python3 benchmarks/run_speed.py profile --out "$OUT/compiled_profile" \
    "${TRACE[@]}" -- "${TRAIN[@]}" --torch_compile true --dataset "$DATA" --output_dir "$OUT/compiled_profile/run"
  rm -rf "$OUT/train_profile/run" "$OUT/compiled_profile/run"  # model weights: not results
  { echo; echo "## bench"; cat "$OUT/bench/throughput.md" 2>/dev/null || echo "(none)"
    echo; echo "## bare step profile"; cat "$OUT/profile.json" 2>/dev/null || echo "(none)"
    echo; echo "## esam-hf train profile (eager, then torch_compile)"
    cat "$OUT/train_profile/profile.json" 2>/dev/null || echo "(none)"
    cat "$OUT/compiled_profile/profile.json" 2>/dev/null || echo "(none)"
    echo; echo "## FSDP2 against one process"; cat "$OUT/fsdp2/fsdp_check.json" 2>/dev/null || echo "(none)"
  } >> "$OUT/summary.md"
  echo; cat "$OUT/summary.md"
  exit 0
fi

part reproduce $(( $(left) - 20 )) esam-hf reproduce "${REPRO[@]}" --dataset "$DATA" --output_dir "$RUNS"
{ echo; echo "## reproduce (epochs reached per run)"
  for run in "$RUNS"/*/; do
    [ -d "$run" ] || continue
    python3 - "$run" <<'PY'
import json, os, sys
run = sys.argv[1]
record = json.load(open(os.path.join(run, "esam_run.json"))) if os.path.isfile(os.path.join(run, "esam_run.json")) else {}
timeline = json.load(open(os.path.join(run, "timeline.json"))) if os.path.isfile(os.path.join(run, "timeline.json")) else {"epochs": []}
last = timeline["epochs"][-1] if timeline["epochs"] else {}
print(f"- {os.path.basename(os.path.normpath(run))}: {record.get('status', 'not started')}, epoch {last.get('epoch', 0)}, "
      f"train s {last.get('train_seconds', 0):.1f}, top-1 {last.get('eval_accuracy', float('nan'))}")
PY
  done
  cat "$RUNS/results.md" 2>/dev/null || true
} >> "$OUT/summary.md"
cp -r "$RUNS"/*.json "$RUNS"/*.md "$OUT/" 2>/dev/null || true
for run in "$RUNS"/*/; do  # records, timelines and results, not checkpoints
  [ -d "$run" ] || continue
  mkdir -p "$OUT/runs/$(basename "$run")"
  cp "$run"/*.json "$run"/README.md "$OUT/runs/$(basename "$run")/" 2>/dev/null || true
done
echo; cat "$OUT/summary.md"
