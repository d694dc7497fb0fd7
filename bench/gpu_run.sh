#!/usr/bin/env bash
# A pipeline run on an offline GPU machine (the GPU runs of docs/RESULTS.md):
#   bash bench/gpu_run.sh MODEL.gguf CONFIGS.json STAGES [RESULTS_DIR]
# Run it from the repository root. The machine needs the packages of requirements.txt (a CUDA build of torch),
# installed from wheels, e.g. `pip install --no-index --find-links WHEELS -r requirements.txt`, or unpacked with
# `pip install --no-index --find-links WHEELS --target SITE -r requirements.txt` and named by SITE (put on PYTHONPATH).
# Paths (environment variables):
#   DATA     folder holding spider_data.zip and mmlu/ (default /tmp/data)
#   WORK     scratch folder; RESULTS_DIR defaults to $WORK/full (default /tmp)
#   LOG_DIR  where the log, report.md, results.json and a tarball of the run's state are written (default $WORK/logs)
#   SITE     optional: a `pip install --target` folder of the wheels, put first on PYTHONPATH
# Sizes default to the full run (all train, all dev, all MMLU); override with SAMPLE_TRAIN, SAMPLE_EVAL,
# MMLU_PER_SUBJECT, EVAL_BATCH. LAUNCH="accelerate launch --multi_gpu --num_processes 2" spreads the run over two
# GPUs (NVLink multicast off: NCCL_NVLS_ENABLE=0). The run stops itself with SIGINT after STOP_AFTER seconds
# (default 560) and a rerun of the same command resumes where it stopped; for a long run started detached
# (`setsid bash bench/gpu_run.sh ... > run.log 2>&1 &`), set STOP_AFTER above its length.
set -o pipefail
DATA=${DATA:-/tmp/data} WORK=${WORK:-/tmp}
LOG_DIR=${LOG_DIR:-$WORK/logs}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
[ -n "${SITE:-}" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$LOG_DIR"
model=$1 configs=$2 stages=$3 results=${4:-$WORK/full}
log="$LOG_DIR/$(basename "$results").log"
start=$(date +%s)
timeout -s INT "${STOP_AFTER:-560}" ${LAUNCH:-python3} main.py --model "$model" --spider-zip "$DATA/spider_data.zip" \
  --mmlu "$DATA/mmlu" --results-dir "$results" --sample-size-train "${SAMPLE_TRAIN:-all}" \
  --sample-size-eval "${SAMPLE_EVAL:-all}" --mmlu-per-subject "${MMLU_PER_SUBJECT:-all}" \
  --eval-batch-size "${EVAL_BATCH:-256}" --training-configs "$configs" --stages "$stages" 2>&1 \
  | grep -v "it/s]\|s/it]\|batch/s]\|q/s]\|examples/s]" | tee -a "$log"
echo "wall: $(( $(date +%s) - start )) s (${LAUNCH:-python3})" | tee -a "$log"
for f in report.md results.json; do
  [ -f "$results/$f" ] && cp "$results/$f" "$LOG_DIR/$(basename "$results")_$f"
done
# the store, stage results, logs and plots (not the checkpoints, adapters or data sets): what a lost machine would lose
[ -d "$results" ] && tar czf "$LOG_DIR/$(basename "$results")_state.tgz" --exclude=checkpoints --exclude=adapter \
  --exclude='*.jsonl' -C "$results" .
exit 0
