"""Fine-tune an open LLM for Text-to-SQL with QLoRA, and report what it gained (Spider EX) and what it cost (MMLU).

    python main.py                       # every stage, with the constants below
    python main.py --demo                # the bundled demo data and SmolLM2-135M-Instruct, minutes on a CPU
    python main.py --stages preprocess,train --sample-size-train 500
    python main.py --eval-dataset my_eval.json --databases my_dbs --stages baseline_ex   # your own data, no Spider
    python main.py --help
    accelerate launch main.py            # the same run spread over every GPU of the machine (README: Several GPUs)

Constants below are the defaults; `.env` (see .env.example: every constant by its name, lists as JSON) overrides
them, and flags override both. The data are Spider's unless PATH_FT_DATASET, PATH_TASK_EVAL_DATASET and
PATH_DATABASES (--ft-dataset, --eval-dataset, --databases) name your own (README: Bring your own data).
Each stage's result is saved under results/; a rerun with the same inputs skips it, an interrupted run resumes.
"""
from __future__ import annotations

import logging
import sys
from contextlib import nullcontext

# --- config --------------------------------------------------------------------------------------------
BASE_MODEL_ID = "openlm-research/open_llama_3b_v2"  # Hub id, local folder or .gguf file
SAMPLE_SIZE_EVAL = 200  # examples of each evaluation set (seeded subset); None = all
SAMPLE_SIZE_TRAIN = 2000  # train examples (seeded subset); None = all
TRAINING_CONFIGS = [  # one QLoRA run per entry; keys and defaults: scripts/training_config.py (OOM: batch halved)
    {"learning_rate": 2e-4, "num_train_epochs": 1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2},
    {"learning_rate": 1e-4, "num_train_epochs": 2, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2},
]
MMLU_PER_SUBJECT = 10  # questions per subject (57 subjects); None = all 14,042
MMLU_K_SHOT = 5
EVAL_BATCH_SIZE = 16  # prompts per generation and MMLU batch; "auto": per batch, the most that fit the GPU memory
MAX_NEW_TOKENS = 160
SQL_TIMEOUT_S = 30.0  # per query, enforced inside SQLite
SCHEMA_SAMPLE_ROWS = 0  # sample rows per table in the prompt's schema
QUANTIZATION = "auto"  # auto: 4-bit NF4 on CUDA, plain float32 LoRA on CPU; or "4bit" / "none"
EVAL_PRECISION = "4bit"  # "4bit": as trained; "merged": adapter merged into the weights it trained on (faster, more memory)
SEED = 0
NUM_CANDIDATES = 0  # execution-guided voting: sampled SQL candidates per question (e.g. 8); 0 or 1 = off
VOTE_TEMPERATURE = 0.7  # sampling of the candidates
VOTE_TOP_P = 0.95
SELECT_ADAPTER_ON = "greedy"  # the best adapter by "greedy" or "voted" EX
# --------------------------------------------------------------------------------------------------------

from scripts import distributed  # noqa: E402
from scripts.errors import UserError  # noqa: E402
from scripts.run_state import StageCache  # noqa: E402
from scripts.cli import parse_args  # noqa: E402
from scripts.settings import Settings, resolve_settings  # noqa: E402
from scripts.store import ResultsStore  # noqa: E402

log = logging.getLogger("main")


def config_defaults() -> dict:
    """The constants above, as settings."""
    return {
        "base_model_id": BASE_MODEL_ID,
        "sample_size_eval": SAMPLE_SIZE_EVAL,
        "sample_size_train": SAMPLE_SIZE_TRAIN,
        "training_configs": TRAINING_CONFIGS,
        "mmlu_per_subject": MMLU_PER_SUBJECT,
        "mmlu_k_shot": MMLU_K_SHOT,
        "eval_batch_size": EVAL_BATCH_SIZE,
        "max_new_tokens": MAX_NEW_TOKENS,
        "sql_timeout_s": SQL_TIMEOUT_S,
        "schema_sample_rows": SCHEMA_SAMPLE_ROWS,
        "quantization": QUANTIZATION,
        "eval_precision": EVAL_PRECISION,
        "seed": SEED,
        "num_candidates": NUM_CANDIDATES,
        "vote_temperature": VOTE_TEMPERATURE,
        "vote_top_p": VOTE_TOP_P,
        "select_adapter_on": SELECT_ADAPTER_ON,
    }


def run(s: Settings) -> dict:
    """The whole pipeline, stage by stage; a stage left out of --stages reuses its saved result if any."""
    # the stages bring torch and transformers (seconds to import): loaded here, so --help and a bad flag answer at once
    from scripts import evaluate, export, mmlu, pre_proc, regression, report, spider_data, training, training_config
    from scripts.cpu_threads import set_cpu_threads
    from scripts.model_source import check_model_source
    from scripts.models import ModelCache

    set_cpu_threads()  # torch is loaded from here on: on a CPU, one thread per core that is free now
    training_config.validate_training_configs(s.training_configs)  # every input is checked before anything is written
    check_model_source(s.base_model_id, s.hf_token)  # a missing path or model, an unknown Hub id, the Hub unreachable
    mmlu.check_data(s)  # PATH_MMLU's files, or the Hub's copy reachable or cached
    report.check_something_to_report(s)  # --stages report alone needs saved stage results
    data = spider_data.prepare_stage(s)  # 1. the train and evaluation sets and their databases (Spider's or yours)
    cache = StageCache(s.results_dir / "stages", force=s.force)
    models = ModelCache(s)
    # under accelerate launch the main process alone opens (and writes) the store; the others pass None
    with ResultsStore(s.db_path) if distributed.is_main() else nullcontext() as store:
        eval_sets = evaluate.eval_examples(s, data)  # each evaluation set's examples (seeded subset)
        baseline_ex = evaluate.sets_stage("baseline_ex", "baseline_ex", s, cache, store, models, eval_sets)  # 2. baseline EX
        baseline_mmlu = mmlu.mmlu_stage("baseline_mmlu", s, cache, store, models)  # 2. baseline MMLU
        train_set = pre_proc.preprocess_stage(s, cache, data.train, models)  # 3. train set in chat format
        models.release()  # the evaluation model leaves the GPU before training loads its own
        adapters = training.train_stage(s, train_set)  # 4. one QLoRA run per config
        tuned_ex = evaluate.adapters_stage(s, cache, store, models, eval_sets, adapters)  # 5. EX per adapter and set
        best = evaluate.best_adapter(tuned_ex, eval_sets, s.select_adapter_on)  # on the first set, greedy or voted EX
        tuned_mmlu = mmlu.mmlu_stage("mmlu_best", s, cache, store, models, adapter=best)  # 6. MMLU of the best
        analysis = regression.regression_stage(s, cache, baseline_mmlu, tuned_mmlu)  # 6. regression analysis
        results = report.report_stage(s, eval_sets, baseline_ex, baseline_mmlu, adapters, tuned_ex, best, tuned_mmlu,
                                      analysis)
        export.export_stage(s, cache, models, results)  # 7. the best adapter merged into its base: RESULTS_DIR/export
        return results


def main(argv: list[str] | None = None) -> int:
    """Entry point: settings, logging, run; a user error is one clear line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not distributed.is_main():  # under accelerate launch the main process logs the run; the others only warnings
        logging.getLogger().setLevel(logging.WARNING)
    try:
        settings = resolve_settings(config_defaults(), parse_args(argv, config_defaults()))
        log.info("settings: %s", settings.public())
        run(settings)
        distributed.finish()
    except UserError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted: finished stages and generated answers are saved; rerun the same command to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
