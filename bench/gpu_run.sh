#!/usr/bin/env bash
# A pipeline run on the GPU machine (docs/RESULTS.md): bash bench/gpu_run.sh MODEL.gguf CONFIGS.json STAGES [RESULTS_DIR]
# Expects the staged wheels in /tmp/site and the data in /tmp/data (../shared/gpu/README.md). Sizes default to the
# full run (all train, all dev, all MMLU); override with SAMPLE_TRAIN, SAMPLE_EVAL, MMLU_PER_SUBJECT, EVAL_BATCH.
# LAUNCH="accelerate launch --multi_gpu --num_processes 2" spreads the run over two GPUs. Stops itself with SIGINT
# after STOP_AFTER seconds (560: inside the device tool's 10-minute limit), so a rerun of the same command resumes.
set -o pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
model=$1 configs=$2 stages=$3 results=${4:-/tmp/full}
log="${OUT:-/tmp}/$(basename "$results").log"
start=$(date +%s)
timeout -s INT "${STOP_AFTER:-560}" ${LAUNCH:-python3} main.py --model "$model" --spider-zip /tmp/data/spider_data.zip \
  --mmlu /tmp/data/mmlu --results-dir "$results" --sample-size-train "${SAMPLE_TRAIN:-all}" \
  --sample-size-eval "${SAMPLE_EVAL:-all}" --mmlu-per-subject "${MMLU_PER_SUBJECT:-all}" \
  --eval-batch-size "${EVAL_BATCH:-256}" --training-configs "$configs" --stages "$stages" 2>&1 \
  | grep -v "it/s]\|s/it]\|batch/s]\|q/s]\|examples/s]" | tee -a "$log"
echo "wall: $(( $(date +%s) - start )) s (${LAUNCH:-python3})" | tee -a "$log"
for f in report.md results.json; do
  [ -f "$results/$f" ] && cp "$results/$f" "${OUT:-/tmp}/$(basename "$results")_$f"
done
# the store, stage results, logs and plots (not the checkpoints, adapters or data sets): what a lost machine would lose
[ -d "$results" ] && tar czf "${OUT:-/tmp}/$(basename "$results")_state.tgz" --exclude=checkpoints --exclude=adapter \
  --exclude='*.jsonl' -C "$results" .
exit 0
