#!/usr/bin/env bash
# Reproduce the GPU results of docs/results.md: a 12-block teacher, then 3-block students of every
# mode (none, kd, mdkd, mdkd without each feature term) x 3 seeds, evaluation reports and the
# demo student export. Fits a fixed time budget: a timed probe epoch sets the epoch counts.
#
#   # once, on a machine that has ../shared/data (packs PBC minus the held-out list, ~47 MB):
#   python examples/pack_pbc.py
#   # then, on the GPU machine, from the repository root:
#   bash examples/train_pbc_gpu.sh
#
# CPU smoke test of the whole script at tiny scale (no GPU; about 2-3 min on 2 cores):
#   RUNS=/tmp/gpu-smoke BUDGET_T=4 BUDGET_S=8 PAR=1 EXTRA="--set data=wsi_pipeline/data/cells --set exclude=null \
#     --set preset=tiny --set img_size=32 --set batch_size=16 --set samples_per_epoch=32 --set threads=1" \
#     bash examples/train_pbc_gpu.sh
# Paths inside the configs are relative to configs/; --set values to the working directory.
# bf16 is decided at run time (bf16: auto in the configs; the decision is in each run's log).
#
# Environment: PY (python), RUNS (runs/gpu), OUT (gets results.tgz with logs, reports and run
# metrics, table.md, progress.log and demo_student.safetensors; LOG holds the loose logs),
# BUDGET_T / BUDGET_S (seconds for the teacher / the student grid), PAR (grid workers),
# EXTRA (extra --set overrides for every run, e.g. "--set samples_per_epoch=256" for a smoke test).
set -u
PY=${PY:-python3}
RUNS=${RUNS:-runs/gpu}
OUT=${OUT:-$RUNS/out}
LOG=${LOG:-$RUNS/logs}
BUDGET_T=${BUDGET_T:-130}
BUDGET_S=${BUDGET_S:-240}
PAR=${PAR:-6}
PAR_EFF=${PAR_EFF:-1.3}   # assumed speed-up of PAR workers sharing one GPU (conservative)
EXTRA=${EXTRA:-}
TCFG=configs/distill_pbc_gpu_teacher.yaml
SCFG=configs/distill_pbc_gpu_student.yaml
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
mkdir -p "$RUNS" "$OUT" "$LOG"
(nvidia-smi -L || echo "no GPU") > "$LOG/hardware.txt" 2>&1
$PY -c "import torch, timm, platform; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available(), platform.processor())" >> "$LOG/hardware.txt" 2>&1
distill() { $PY -m distill.cli "$@"; }
epoch_seconds() { $PY -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(min(x['seconds'] for x in r))" "$1"; }

archive() {
  # Everything small that the results table needs, in one archive (weights and states stay).
  if [ ! -f "$OUT/demo_student.safetensors" ] && [ -f "$RUNS/mdkd-s0/model.safetensors" ]; then
    distill export "$RUNS/mdkd-s0" --out "$OUT/demo_student.safetensors" --fp16 >> "$OUT/progress.log" 2>&1
  fi
  [ -f "$OUT/table.md" ] || $PY -m distill.experiments table --runs "$RUNS" > "$OUT/table.md" 2>&1
  cp "$OUT/progress.log" "$LOG/" 2>/dev/null
  tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='state.pt' --exclude='worker.pid' \
    --exclude='cache' --exclude='out' -C "$RUNS" . 2>/dev/null
}
# ARCHIVE_ONLY=1: just pack what exists (after a run stopped by a time limit).
if [ -n "${ARCHIVE_ONLY:-}" ]; then archive; exit 0; fi

start=$(date +%s)
echo "== probe epochs" | tee -a "$OUT/progress.log"
distill train-teacher --config $TCFG --set epochs=2 --set out=$RUNS/probe/teacher $EXTRA > "$LOG/probe.log" 2>&1 || { cat "$LOG/probe.log"; exit 1; }
distill distill --config $SCFG --mode mdkd --teacher $RUNS/probe/teacher/model.safetensors --set epochs=2 --set out=$RUNS/probe/student $EXTRA >> "$LOG/probe.log" 2>&1 || { cat "$LOG/probe.log"; exit 1; }
t_t=$(epoch_seconds $RUNS/probe/teacher/metrics.jsonl)
t_s=$(epoch_seconds $RUNS/probe/student/metrics.jsonl)
read -r E_T E_S < <($PY -c "
import sys; tt, ts, bt, bs, par = map(float, sys.argv[1:])
print(max(2, min(200, int(bt / tt))), max(2, min(120, int(bs * par / (18 * ts)))))" "$t_t" "$t_s" "$BUDGET_T" "$BUDGET_S" "$PAR_EFF")
echo "probe: teacher epoch ${t_t}s, student epoch ${t_s}s -> teacher $E_T epochs, students $E_S epochs ($(( $(date +%s) - start ))s so far)" | tee -a "$OUT/progress.log"

echo "== teacher" | tee -a "$OUT/progress.log"
timeout $(( BUDGET_T * 3 / 2 + 30 )) $PY -m distill.cli train-teacher --config $TCFG --set epochs=$E_T --set out=$RUNS/teacher $EXTRA > "$LOG/teacher.log" 2>&1 || { tail -5 "$LOG/teacher.log"; exit 1; }
tail -1 "$RUNS/teacher/metrics.jsonl" | tee -a "$OUT/progress.log"

echo "== student grid ($PAR workers, $(( $(date +%s) - start ))s so far)" | tee -a "$OUT/progress.log"
for i in $(seq "$PAR"); do
  timeout $(( BUDGET_S + 40 )) $PY -m distill.experiments grid --config $SCFG --runs "$RUNS" --seeds 0,1,2 \
    --set epochs=$E_S --set threads=2 --set teacher=$RUNS/teacher/model.safetensors $EXTRA > "$LOG/grid-$i.log" 2>&1 &
  sleep 3
done
wait
echo "grid done ($(( $(date +%s) - start ))s so far)" | tee -a "$OUT/progress.log"

echo "== reports and export" | tee -a "$OUT/progress.log"
models=("$RUNS/teacher/model.safetensors")
for v in none kd mdkd mdkd-no-spatial mdkd-no-channel mdkd-no-cls; do
  [ -f "$RUNS/$v-s0/model.safetensors" ] && models+=("$RUNS/$v-s0/model.safetensors")
done
distill evaluate "${models[@]}" --config $SCFG --out "$LOG/reports" $EXTRA > "$LOG/evaluate.log" 2>&1 || tail -3 "$LOG/evaluate.log"
$PY -m distill.experiments table --runs "$RUNS" --reports "$LOG/reports" > "$OUT/table.md" 2>&1
archive
echo "total $(( $(date +%s) - start ))s" | tee -a "$OUT/progress.log"
cat "$OUT/table.md"
