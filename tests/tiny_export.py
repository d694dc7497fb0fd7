"""A finished run in miniature, for the export and ask tests: a tiny base model, a LoRA adapter whose weights change
the answers, the results.json figures of a run, and its settings (CPU, quantization none)."""
from __future__ import annotations

from pathlib import Path

import torch

from scripts.settings import STAGES, Settings
from tests.tiny_models import save_tiny_model, save_tiny_sentencepiece_model

RUN_NAME = "run_a"
TRAINING_CONFIG = {"learning_rate": 1e-2, "max_steps": 3, "per_device_train_batch_size": 2}


def save_tiny_adapter(folder: Path, model_dir: Path, seed: int = 1) -> Path:
    """A LoRA adapter on the tiny model with random (non-zero) weights, saved with its tokenizer as training does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from scripts.models import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                            task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_" in name:
                weight.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    load_tokenizer(str(model_dir)).save_pretrained(folder)
    return Path(folder)


def tiny_settings(root: Path, model_dir: Path, **overrides) -> Settings:
    """Settings of a CPU run on the tiny model with every output under root."""
    values = dict(base_model_id=str(model_dir), sample_size_eval=10, sample_size_train=12,
                  training_configs=[TRAINING_CONFIG], results_dir=root / "results",
                  db_path=root / "results" / "results.sqlite", quantization="none", max_new_tokens=24,
                  stages=STAGES)
    values.update(overrides)
    return Settings(**values)


def tiny_results(settings: Settings, adapter: Path) -> dict:
    """results.json of a run whose one adapter is the best, with every figure the model card shows."""
    return {
        "created": "2026-12-01T00:00:00+00:00",
        "settings": settings.public(),
        "eval_sets": [{"name": "spider_dev", "source": "spider", "examples": 10}],
        "baseline": {"ex": {"ex": 0.1, "count": 10}, "mmlu": {"accuracy": 0.3, "count": 9},
                     "ex_by_set": {"spider_dev": {"ex": 0.1, "count": 10, "voted": {"ex": 0.2, "n": 4}}}},
        "runs": {RUN_NAME: {
            "adapter_dir": str(adapter), "config": TRAINING_CONFIG,
            "training": {"steps": 3, "loss_start": 2.25, "loss_end": 1.5, "examples": 12},
            "ex": {"ex": 0.6, "count": 10},
            "ex_by_set": {"spider_dev": {"ex": 0.6, "count": 10, "voted": {"ex": 0.7, "n": 4}}}}},
        "best_adapter": str(adapter),
        "best_mmlu": {"accuracy": 2 / 9, "count": 9},
        "regression": {"n": 9, "mcnemar_p": 0.625, "ci_low": -0.333, "ci_high": 0.111, "ci_level": 0.95,
                       "verdict": "MMLU fell 7.8 points; on 9 questions that is noise."},
    }


def tiny_run(root: Path, sentencepiece: bool = False) -> tuple[Settings, dict]:
    """(settings, results) of a finished tiny run under root: base model (a chat model, or with `sentencepiece` a
    base model with OpenLLaMA's tokenizer layout), best adapter, results."""
    model_dir = (save_tiny_sentencepiece_model(root / "model")[0] if sentencepiece
                 else save_tiny_model(root / "model", kind="chatml"))
    adapter = save_tiny_adapter(root / "results" / RUN_NAME / "adapter", model_dir)
    settings = tiny_settings(root, model_dir)
    return settings, tiny_results(settings, adapter)


def export_tiny_run(root: Path, sentencepiece: bool = False) -> tuple[Settings, dict, Path]:
    """(settings, results, export folder): a tiny run (see tiny_run), exported."""
    from scripts.export import export_dir, export_stage
    from scripts.models import ModelCache
    from scripts.run_state import StageCache

    settings, results = tiny_run(root, sentencepiece)
    export_stage(settings, StageCache(settings.results_dir / "stages"), ModelCache(settings), results)
    return settings, results, export_dir(settings.results_dir)
