"""Stage 3: the train set's examples (Spider train or the user's) -> a prompt/completion dataset for SFT.

The dataset is written to `<RESULTS_DIR>/train_chat.jsonl` (schema text, sampling, length limits).

Each row: `prompt` (exactly the inference prompt, scripts.prompts.render), `completion` (gold SQL + end of turn),
`db_id`, `question`, `num_tokens` (prompt + completion, tokenized without added special tokens, as in training).
A prompt over `max_length` tokens is first shortened (its sample rows dropped), else the example is skipped;
examples whose database is missing take their schema from tables.json, or are skipped when it lacks them too.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

from datasets import Dataset

from scripts import distributed
from scripts.errors import UserError
from scripts.prompts import render
from scripts.spider_data import sample_examples as sample_subset  # one seeded sampler for the whole pipeline

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 1024  # tokens, when no TRAINING_CONFIGS entry sets max_length
SchemaFn = Callable[[Path, int], str]


def _default_schema_fn() -> SchemaFn:
    """scripts.databases.schema_text (imported late: the databases belong to stage 1)."""
    from scripts.databases import schema_text

    return schema_text


@lru_cache(maxsize=4)
def _tables_by_db(tables_file: str) -> dict[str, dict]:
    """tables.json indexed by db_id."""
    return {entry["db_id"]: entry for entry in json.loads(Path(tables_file).read_text())}


_RESERVED = frozenset("""
    abort action add after all alter analyze and as asc attach autoincrement before begin between by cascade case
    cast check collate column commit conflict constraint create cross current_date current_time current_timestamp
    database default deferrable deferred delete desc detach distinct drop each else end escape except exclusive
    exists explain fail for foreign from full glob group having if ignore immediate in index indexed initially inner
    insert instead intersect into is isnull join key left like limit match natural no not notnull null of offset on
    or order outer plan pragma primary query raise recursive references regexp reindex release rename replace
    restrict right rollback row savepoint select set table temp temporary then to transaction trigger union unique
    update using vacuum values view virtual when where with without
""".split())


def quote_identifier(name: str) -> str:
    """A table/column name as SQLite accepts it: bare when plain, else in double quotes (spaces, keywords)."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name.lower() not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def schema_from_tables_json(tables_file: Path | None, db_id: str) -> str | None:
    """CREATE TABLE statements built from Spider's tables.json (no rows), or None when the db_id is not there."""
    if tables_file is None or not Path(tables_file).exists():
        return None
    entry = _tables_by_db(str(tables_file)).get(db_id)
    if entry is None:
        return None
    tables = entry["table_names_original"]
    columns = entry["column_names_original"]
    types = entry["column_types"]
    primary = {i for key in entry.get("primary_keys", []) for i in (key if isinstance(key, list) else [key])}
    q = quote_identifier
    statements = []
    for t, table in enumerate(tables):
        if table.lower().startswith("sqlite_"):  # SQLite's own tables (sqlite_sequence): not part of the schema
            continue
        lines = [f"  {q(name)} {types[i]}" + (" PRIMARY KEY" if i in primary else "")
                 for i, (owner, name) in enumerate(columns) if owner == t]
        for src, dst in entry.get("foreign_keys", []):
            if columns[src][0] == t:
                lines.append(f"  FOREIGN KEY ({q(columns[src][1])}) REFERENCES {q(tables[columns[dst][0]])}({q(columns[dst][1])})")
        statements.append(f"CREATE TABLE {q(table)} (\n" + ",\n".join(lines) + "\n);")
    return "\n".join(statements)


def count_tokens(tokenizer, prompt: str, completion: str) -> int:
    """Tokens of prompt + completion as training sees them (no special tokens added by the tokenizer)."""
    return len(tokenizer(prompt + completion, add_special_tokens=False)["input_ids"])


def build_sft_dataset(
    examples: Sequence[dict],
    layout,
    tokenizer,
    *,
    max_length: int,
    sample_rows: int = 0,
    sample_size: int | None = None,
    seed: int = 0,
    schema_fn: SchemaFn | None = None,
) -> tuple[Dataset, dict]:
    """(prompt/completion Dataset, stats) from Spider examples; long or schema-less examples shortened or skipped."""
    schema_fn = schema_fn or _default_schema_fn()
    chosen = sample_subset(examples, sample_size, seed)
    stats = {"examples": len(examples), "sampled": len(chosen), "kept": 0, "shortened": 0, "skipped_too_long": 0,
             "skipped_no_schema": 0, "schema_from_tables_json": 0, "max_tokens": 0, "mean_tokens": 0.0,
             "max_length": max_length}
    rows = []
    for example in chosen:
        row = _example_row(example, layout, tokenizer, max_length, sample_rows, schema_fn, stats)
        if row is not None:
            rows.append(row)
    stats["kept"] = len(rows)
    if rows:
        stats["max_tokens"] = max(r["num_tokens"] for r in rows)
        stats["mean_tokens"] = round(sum(r["num_tokens"] for r in rows) / len(rows), 1)
    log.info(
        "train set: %d of %d sampled examples kept (%d shortened, %d skipped over %d tokens, %d skipped without "
        "schema, %d schemas from tables.json); tokens mean %.0f, max %d",
        stats["kept"], stats["sampled"], stats["shortened"], stats["skipped_too_long"], max_length,
        stats["skipped_no_schema"], stats["schema_from_tables_json"], stats["mean_tokens"], stats["max_tokens"],
    )
    columns = ("prompt", "completion", "db_id", "question", "num_tokens")
    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns}), stats


def _example_row(example, layout, tokenizer, max_length, sample_rows, schema_fn, stats) -> dict | None:
    """One dataset row for an example, or None (counted in stats) when it has no schema or stays too long."""
    db_path = layout.db_path(example["db_id"])
    if db_path is None:
        schema = schema_from_tables_json(getattr(layout, "tables_file", None), example["db_id"])
        if schema is None:
            stats["skipped_no_schema"] += 1
            return None
        stats["schema_from_tables_json"] += 1
        attempts = [schema]
    else:
        attempts = [schema_fn(db_path, sample_rows)] + ([schema_fn(db_path, 0)] if sample_rows > 0 else [])
    for i, schema in enumerate(attempts):
        prompt, completion = render(tokenizer, schema, example["question"], answer=example["query"])
        num_tokens = count_tokens(tokenizer, prompt, completion)
        if num_tokens <= max_length:
            stats["shortened"] += i > 0
            return {"prompt": prompt, "completion": completion, "db_id": example["db_id"],
                    "question": example["question"], "num_tokens": num_tokens}
    stats["skipped_too_long"] += 1
    return None


def save_jsonl(dataset: Dataset, path: Path) -> Path:
    """Write the dataset as JSON lines (one row per line), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in dataset:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def load_jsonl(path: Path) -> Dataset:
    """Read a dataset written by save_jsonl; a missing or malformed file is a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"the pre-processed train set {path} is missing; run the 'preprocess' stage first")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n} is not JSON ({e}); delete the file and rerun the 'preprocess' stage") from None
        if not isinstance(row, dict) or not {"prompt", "completion"} <= set(row):
            raise UserError(f"{path} line {n} lacks 'prompt'/'completion'; delete the file and rerun 'preprocess'")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no examples; rerun the 'preprocess' stage with a larger SAMPLE_SIZE_TRAIN")
    return Dataset.from_list(rows)


def preprocess_max_length(training_configs: list[dict]) -> int:
    """The longest max_length any training run allows (each run drops what exceeds its own)."""
    lengths = [c["max_length"] for c in training_configs if c.get("max_length")]
    return max(lengths) if lengths else DEFAULT_MAX_LENGTH


def preprocess_stage(settings, cache, train, models) -> dict | None:
    """Stage 3: build, log and save the train set (a DataSet of stage 1); returns {"path", "fingerprint", "stats"}.

    The key (and so every training run's name) hashes the examples and their databases' content, not their paths.
    """
    from scripts.run_state import fingerprint

    if train is None:  # nothing to train on in this run (stage 1 said why when a stage needed it)
        if "preprocess" in settings.stages:
            raise UserError("the preprocess stage has no train set: set PATH_FT_DATASET (--ft-dataset) to your "
                            "train file, or provide spider_data.zip (PATH_SPIDER_ZIP)")
        return None
    max_length = preprocess_max_length(settings.training_configs)
    key = fingerprint(
        "preprocess", settings.base_model_id, train.fingerprint,
        settings.sample_size_train, settings.seed, settings.schema_sample_rows, max_length,
    )
    path = settings.train_chat_file
    if "preprocess" not in settings.stages:
        return cache.load("preprocess", key)

    def compute() -> dict:
        _, tokenizer = models.get()
        dataset, stats = build_sft_dataset(
            train.examples, train.layout, tokenizer, max_length=max_length, sample_rows=settings.schema_sample_rows,
            sample_size=settings.sample_size_train, seed=settings.seed,
        )
        if len(dataset) == 0:
            raise UserError(f"no example of {train.source} fits in max_length={max_length} tokens or has a schema: "
                            f"raise max_length in TRAINING_CONFIGS or lower SCHEMA_SAMPLE_ROWS ({stats})")
        if distributed.is_main():  # under accelerate launch every process builds the same set; one writes it
            save_jsonl(dataset, path)
            log.info("train set saved to %s", path)
        return {"path": str(path), "fingerprint": key, "stats": stats, "source": train.source}

    result = cache.run("preprocess", key, compute)
    if distributed.broadcast(not Path(result["path"]).exists()):  # saved stage result but the file was deleted
        result = compute()
        if distributed.is_main():
            cache.save("preprocess", key, result)
        distributed.barrier()  # the file is written before any process reads it
    return result
