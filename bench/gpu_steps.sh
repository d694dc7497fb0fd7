#!/usr/bin/env bash
# The GPU measurements of docs/RESULTS.md, one step at a time, on an offline GPU machine:
#   bash bench/gpu_steps.sh STEP   (from the repository root)
# The machine needs the packages of requirements.txt (a CUDA build of torch), installed from wheels, e.g.
# `pip install --no-index --find-links WHEELS -r requirements.txt`, or unpacked with
# `pip install --no-index --find-links WHEELS --target SITE -r requirements.txt` and named by SITE.
# Paths (environment variables):
#   MODELS   folder holding qwen.gguf (the Q4_K_M GGUF of Qwen2.5-Coder-0.5B-Instruct) and smollm2.gguf
#            (SmolLM2-135M-Instruct) (default /tmp/m)
#   DATA     folder holding spider_data.zip and mmlu/ (default /tmp/data)
#   WORK     scratch: results folders, the unpacked Spider and the seed models (default /tmp)
#   LOG_DIR  where logs and JSON are written (default $WORK/logs)
#   SITE     optional: a `pip install --target` folder of the wheels, put first on PYTHONPATH
# STEP one of
#   env          versions and GPU
#   smol_mmlu    SmolLM2-135M-Instruct in bf16 (--quantization none) on all 14,042 MMLU questions; its exact ties
#   qwen_gen     generation benchmark: Qwen2.5-Coder-0.5B (4-bit; ADAPTER, PRECISION) on dev questions with a database
#   qwen_profile ms per decoding step of Qwen (ADAPTER, PRECISION, BATCHES) and its top ops (KERNELS)
#   seed_build   build both seed models into $WORK/seed (long: start it detached, `setsid ... > seed.log 2>&1 &`)
#   seed LAYOUT GIB [EXTRA MAIN ARGS]   a random-weight model of a seed's layout through main.py, capped to GIB
#   profile LAYOUT   ms per decoding step of a seed model at batch 16 (QUANTIZATIONS, DECODERS, CACHES)
#   qwen_train   Qwen: one epoch on all of Spider train (section 13's best config) and the adapter's EX in 4-bit
#   qwen_merged  the same adapter's EX with EVAL_PRECISION=merged (EVAL_BATCH: the pass time at other batch sizes)
#   smol_train   SmolLM2: one epoch on all of Spider train (section 1's best config on one GPU, 25.8% EX there)
#   qwen_vote    its greedy and voted EX (CANDIDATES=8, PRECISION=merged by default: greedy merged beside it)
# Sizes are environment variables (defaults in each step). The full runs (qwen_train, qwen_merged, qwen_vote,
# smol_train) end within STOP_AFTER seconds (default 560, SIGINT) and a rerun of the same step resumes; for one
# run to the end, start it detached with STOP_AFTER above its length, e.g.
#   STOP_AFTER=1700 setsid bash bench/gpu_steps.sh qwen_train > qwen_train.log 2>&1 &
set -o pipefail
MODELS=${MODELS:-/tmp/m} DATA=${DATA:-/tmp/data} WORK=${WORK:-/tmp}
LOG_DIR=${LOG_DIR:-$WORK/logs}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -n "${SITE:-}" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$LOG_DIR"
quiet() { grep -v "it/s]\|s/it]\|batch/s]\|q/s]\|examples/s]\|B/s]"; }
data=(--spider-zip "$DATA/spider_data.zip" --mmlu "$DATA/mmlu")
seeds=$WORK/seed

full_run() {  # STEP MODEL RESULTS CONFIG [MAIN ARGS]: main.py on all of Spider, stopped (resumable) at STOP_AFTER
  local step=$1 model=$2 results=$3 config=$4; shift 4
  timeout -s INT "${STOP_AFTER:-560}" python3 main.py --model "$model" "${data[@]}" --results-dir "$results" \
    --sample-size-train all --sample-size-eval all --eval-batch-size "${EVAL_BATCH:-256}" \
    --training-configs "$config" "$@" 2>&1 | quiet | grep -i "EX \|voted\|training\|error\|tokens/s" | tail -n 12
  # each stage result beside the logs, '@' of the stage names replaced by '__' (plain file names)
  for f in "$results"/stages/*.json; do b=$(basename "$f"); cp "$f" "$LOG_DIR/${step}_${b//@/__}"; done
}

case $1 in
  env)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', \
bitsandbytes.__version__)"
    date -u ;;
  smol_mmlu)
    python3 main.py --model "$MODELS/smollm2.gguf" "${data[@]}" --results-dir "$WORK/r_smol" --quantization none \
      --mmlu-per-subject all --eval-batch-size "${EVAL_BATCH:-64}" --stages data,baseline_mmlu 2>&1 | quiet \
      | tail -n 25
    python3 -m bench.mmlu_ties "$WORK/r_smol/results.sqlite" ;;
  qwen_gen)
    python3 -m bench.bench_generation "$MODELS/qwen.gguf" "$DATA/spider_data.zip" --n "${N:-1034}" \
      --quantization 4bit --only "${ONLY:-graph,batch 256 pruned}" ${ADAPTER:+--adapter "$ADAPTER"} \
      --eval-precision "${PRECISION:-4bit}" --out "$LOG_DIR" 2>&1 | quiet | tail -n 20 ;;
  qwen_profile)  # where a Qwen pass spends its time: ms per step and the ops that took the most time
    python3 -m bench.profile_generation "$MODELS/qwen.gguf" "$DATA/spider_data.zip" --quantization 4bit \
      ${ADAPTER:+--adapter "$ADAPTER"} --eval-precision "${PRECISION:-4bit}" --batch-sizes "${BATCHES:-1024}" \
      --decoders "${DECODERS:-prune,graph}" --caches "${CACHES:-roomy}" --kernels "${KERNELS:-25}" --out "$LOG_DIR" 2>&1 | quiet | tail -n 80 ;;
  seed_build)
    [ -d "$WORK/sp/spider_data" ] || python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
      "$DATA/spider_data.zip" "$WORK/sp"
    for layout in ${LAYOUTS:-mistral_7b open_llama_3b}; do
      [ -f "$seeds/$layout/config.json" ] || python3 -m bench.seed_models "$layout" --out "$seeds/$layout" \
        --corpus "$WORK/sp/spider_data" 2>&1 | quiet | tail -n 5
    done ;;
  seed)
    layout=$2 gib=$3; shift 3
    [ -f "$seeds/$layout/config.json" ] || LAYOUTS=$layout bash "$0" seed_build
    python3 -m bench.capped_run --gpu-gb "$gib" --out "$LOG_DIR/${layout}_${gib}gb.json" -- --model "$seeds/$layout" \
      "${data[@]}" --results-dir "$WORK/r_${layout}_${gib}" --sample-size-train "${TRAIN:-300}" \
      --sample-size-eval "${EVAL:-100}" --mmlu-per-subject "${MMLU:-3}" --force "$@" 2>&1 | quiet | tail -n 40 ;;
  profile)  # ms per decoding step of a seed model at batch 16, 4-bit and unquantized bf16, both decoders
    for q in ${QUANTIZATIONS:-4bit none}; do
      python3 -m bench.profile_generation "$seeds/$2" "$DATA/spider_data.zip" --batch-sizes 16 --n 32 \
        --quantization $q --decoders "${DECODERS:-prune,graph}" --caches "${CACHES:-roomy,concat}" \
        --max-new-tokens "${STEPS:-64}" --out "$LOG_DIR" 2>&1 | quiet | tail -n 12
      cp "$LOG_DIR/profile_generation.json" "$LOG_DIR/profile_${2}_$q.json"
    done ;;
  qwen_train|qwen_merged|qwen_vote)  # the best config of section 13 (62.1% EX there), then EX merged, then voting
    extra=(--eval-precision 4bit --stages data,preprocess,train,eval_adapters)
    [ "$1" = qwen_merged ] && extra=(--eval-precision merged --stages data,eval_adapters)
    [ "$1" = qwen_vote ] && extra=(--num-candidates "${CANDIDATES:-8}" --eval-precision "${PRECISION:-merged}" \
      --stages data,eval_adapters)
    full_run "$1" "$MODELS/qwen.gguf" "$WORK/r_qwen" bench/configs/qwen_2e-4.json "${extra[@]}" ;;
  smol_train)  # section 1's best config (lr 1e-3, effective batch 16) on one GPU, and its EX in 4-bit
    full_run "$1" "$MODELS/smollm2.gguf" "$WORK/r_smol" bench/configs/smollm2_1e-3.json \
      --stages data,preprocess,train,eval_adapters ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
