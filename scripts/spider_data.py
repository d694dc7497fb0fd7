"""Stage 1: the run's data sets and their databases, every input checked: the user's own files, else Spider's.

`prepare_stage(settings)` gives the run's `RunData`: the train set (the user's PATH_FT_DATASET, else Spider
train) and the evaluation sets (the user's PATH_TASK_EVAL_DATASET files, else Spider dev), each a `DataSet`
with the databases it runs on (PATH_DATABASES, else Spider's database folder). Spider is unpacked only when
something comes from it (scripts/spider_release.py). A user's file is a JSON list or JSON lines of {question,
query, db_id} (scripts/example_files.py); its examples without a database, on a database without tables (one
warning per database) and those whose gold query fails on its database are reported and left out, and a database
file that cannot be read or is not SQLite stops the run. Missing Spider
databases are not fatal: `missing_databases` counts the examples per db_id that cannot be executed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from custom_metrics.execution_accuracy import DB_MISSING, OK, check_golds, database_files, database_path
from custom_metrics.safe_sqlite import pending_wal
from scripts import distributed
from scripts.databases import SpiderLayout, databases_layout, sqlite_file_problem
from scripts.errors import UserError
from scripts.example_files import REQUIRED_FIELDS, read_examples_and_places
from scripts.spider_release import FIX_HINT, load_split, prepare_spider
from scripts.store import data_fingerprint

log = logging.getLogger(__name__)

SPIDER_SET_NAMES = {"train": "spider_train", "dev": "spider_dev"}
SHOWN_PROBLEMS = 5  # examples named in a warning about left-out examples
USER_FIX = "see README, Bring your own data"
TRAIN_SETTING = "PATH_FT_DATASET (--ft-dataset)"
EVAL_SETTING = "PATH_TASK_EVAL_DATASET (--eval-dataset)"
DATABASES_SETTING = "PATH_DATABASES (--databases)"
EX_STAGES = ("baseline_ex", "eval_adapters")


@dataclass(frozen=True)
class DataSet:
    """One set of examples (a Spider split or a user's file) with the databases it runs on."""

    name: str  # what the set is stored and reported under: spider_train, spider_dev or the file's stem
    source: str  # what messages name: the file(s)
    examples: list[dict]
    layout: SpiderLayout
    fingerprint: str  # the content of the examples and of their databases (not their paths)


@dataclass(frozen=True)
class RunData:
    """What stage 1 hands on: the train set (None when nothing needs it) and the evaluation sets, first = selection."""

    train: DataSet | None
    eval_sets: list[DataSet]


# --- stage entry points ----------------------------------------------------------------------------------

def prepare_stage(settings) -> RunData:
    """Stage 1 for main.py: every data input checked before anything is written; Spider only when it is used."""
    user_databases = _user_databases(settings.path_databases)
    files = ([(settings.path_ft_dataset, TRAIN_SETTING)] if settings.path_ft_dataset else []) + [
        (path, EVAL_SETTING) for path in settings.path_task_eval_dataset]
    for path, setting in files:  # the user's files are read first: a bad one stops the run before Spider is unpacked
        read_user_examples(path, setting)
    _check_unique_names(settings.path_task_eval_dataset)
    spider = _spider_if_used(settings)
    databases = user_databases or (spider and databases_layout(spider.database_dir))
    timeout = settings.sql_timeout_s
    if settings.path_ft_dataset:
        train = load_user_set(settings.path_ft_dataset, TRAIN_SETTING, databases, timeout)
    else:
        train = spider_set(spider, "train", user_databases) if spider else None
    if settings.path_task_eval_dataset:
        eval_sets = [load_user_set(path, EVAL_SETTING, databases, timeout, unique=True)
                     for path in settings.path_task_eval_dataset]
    else:
        eval_sets = [spider_set(spider, "dev", user_databases)] if spider else []
    return RunData(train=train, eval_sets=eval_sets)


def spider_set(layout: SpiderLayout, split: str, databases: SpiderLayout | None = None) -> DataSet:
    """A Spider split as a DataSet (every example kept; those without a database logged), on its own or given databases."""
    if databases is not None:
        layout = dataclasses.replace(layout, database_dir=databases.database_dir)
    examples = load_split(layout, split)
    source = ", ".join(str(p) for p in layout.split_files[split])
    missing = missing_databases(layout, examples)
    if distributed.is_main():
        log.info("Spider %s: %d examples over %d databases (%s)", split, len(examples),
                 len({e["db_id"] for e in examples}), ", ".join(p.name for p in layout.split_files[split]))
        if missing:
            log.warning("Spider %s: %d examples have no database in %s (not executable, excluded from EX): %s",
                        split, sum(missing.values()), layout.database_dir, missing)
    name = SPIDER_SET_NAMES[split]
    return DataSet(name, source, examples, layout, set_fingerprint(examples, layout))


def load_user_set(path: Path, setting: str, databases: SpiderLayout, timeout: float, unique: bool = False) -> DataSet:
    """A user's train or evaluation file, checked: examples without a database, on a database without tables or
    with a failing gold left out.

    `unique` (evaluation sets) also leaves out a repeated (db_id, question): the store keys an answer by them.
    """
    path = Path(path)
    examples, places = read_user_examples(path, setting)
    tableless = _check_database_files(examples, databases, path)
    no_tables = Counter(e["db_id"] for e in examples if e["db_id"] in tableless)
    usable = [(place, e) for place, e in zip(places, examples) if e["db_id"] not in tableless]
    outcomes = check_golds([e["query"] for _, e in usable], [e["db_id"] for _, e in usable], databases.database_dir,
                           timeout=timeout)
    kept, no_db, failing, repeated, seen = [], Counter(), [], [], {}
    for (place, example), outcome in zip(usable, outcomes):
        key = (example["db_id"], example["question"])
        if outcome["error"] == DB_MISSING:
            no_db[example["db_id"]] += 1
        elif outcome["error"] != OK:
            failing.append(f"{place} ({example['db_id']}): {outcome['message']}")
        elif unique and key in seen:
            repeated.append(f"{place} repeats {seen[key]}")
        else:
            seen[key] = place
            kept.append(example)
    if distributed.is_main():
        _report_tableless(path, len(examples), tableless, no_tables)
        _report_left_out(path, databases.database_dir, len(examples), no_db, failing, repeated)
    if not kept:
        raise UserError(f"{setting}: no example of {path} can be used ({sum(no_db.values())} without a database in "
                        f"{databases.database_dir}, {sum(no_tables.values())} on a database without tables, "
                        f"{len(failing)} with a failing gold query); fix the file or {DATABASES_SETTING} ({USER_FIX})")
    if distributed.is_main():
        log.info("%s: %d examples over %d databases in %s", path, len(kept), len({e["db_id"] for e in kept}),
                 databases.database_dir)
    return DataSet(path.stem, str(path), kept, databases, set_fingerprint(kept, databases))


def read_user_examples(path: Path, setting: str) -> tuple[list[dict], tuple[str, ...]]:
    """A user's file: it exists, parses, each entry has question/query/db_id (other fields dropped); with places."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise UserError(f"{setting}: {path} {what}; give a JSON list or JSON lines file of "
                        f"{{\"question\", \"query\", \"db_id\"}} examples ({USER_FIX})")
    data, places = read_examples_and_places(path, USER_FIX)
    if not data:
        raise UserError(f"{setting}: {path} holds no examples; add {{\"question\", \"query\", \"db_id\"}} "
                        f"entries ({USER_FIX})")
    return [{k: e[k] for k in REQUIRED_FIELDS} for e in data], places


def missing_databases(layout: SpiderLayout, examples: Iterable[dict]) -> dict[str, int]:
    """How many examples per db_id have no database file (sorted by db_id; empty when all are present)."""
    counts = Counter(e["db_id"] for e in examples)
    return {db_id: counts[db_id] for db_id in sorted(counts) if layout.db_path(db_id) is None}


def sample_examples(examples: Sequence[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded random subset of n examples in their original order; None (or n >= len) keeps all."""
    if n is None or n >= len(examples):
        return list(examples)
    if n <= 0:
        raise UserError(f"sample size must be a positive integer or None (all), got {n!r}")
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def set_fingerprint(examples: Sequence[dict], layout: SpiderLayout) -> str:
    """A hash of what a set's results depend on: its examples and the bytes of their databases (not the paths)."""
    db_ids = sorted({e["db_id"] for e in examples})
    return data_fingerprint([[[e[k] for k in REQUIRED_FIELDS] for e in examples],
                             {db_id: databases_fingerprint(layout.database_dir, db_id) for db_id in db_ids}])


def databases_fingerprint(database_dir: Path, db_id: str) -> list[str] | None:
    """sha256 of each file a query of db_id runs on, and of its -wal when that holds changes (None: no database)."""
    files = database_files(database_dir, db_id)
    if files is None:
        return None
    return [_database_sha256(p.resolve()) for p in files]


def _database_sha256(path: Path) -> str:
    """sha256 of a database file, followed by that of its -wal when it is not empty (it holds committed changes)."""
    digests = [_file_sha256(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (path, pending_wal(path)) if p]
    return ":".join(digests)


@lru_cache(maxsize=1024)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of one version of a file (read once per process)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _user_databases(path: Path | None) -> SpiderLayout | None:
    """PATH_DATABASES as a layout, or None when not set; it must be a folder."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "not found"
        raise UserError(f"{DATABASES_SETTING}: {path} {what}; give the folder that holds <db_id>/<db_id>.sqlite "
                        f"or <db_id>.sqlite for each db_id of your examples ({USER_FIX})")
    return databases_layout(path)


def _spider_if_used(settings) -> SpiderLayout | None:
    """Spider's layout when a set or the databases come from it (unpacked once), else None; needed but absent: an error."""
    stages = set(settings.stages)
    needs = []
    if settings.path_databases is None:
        needs.append(f"the databases ({DATABASES_SETTING} is not set)")
    if not settings.path_ft_dataset and "preprocess" in stages:
        needs.append(f"the train set of the preprocess stage ({TRAIN_SETTING} is not set)")
    if not settings.path_task_eval_dataset and stages & set(EX_STAGES):
        needs.append(f"the evaluation set ({EVAL_SETTING} is not set)")
    from_spider = not settings.path_ft_dataset or not settings.path_task_eval_dataset
    present = Path(settings.spider_zip).exists()
    if not needs and not (from_spider and present):
        log.info("Spider is not used: the data sets and databases are your own")
        return None
    if needs and not present:
        raise UserError(f"Spider data not found: {settings.spider_zip} does not exist, and this run takes "
                        f"{'; '.join(needs)} from it. Put spider_data.zip there or set PATH_SPIDER_ZIP (or "
                        f"--spider-zip) ({FIX_HINT}), or give your own data ({USER_FIX})")
    with distributed.main_process_first():  # under accelerate launch the main process unpacks, the others find it done
        return prepare_spider(settings.spider_zip, settings.data_dir)


def _check_database_files(examples: list[dict], databases: SpiderLayout, source: Path) -> dict[str, Path]:
    """A database file that exists but cannot be read or is not SQLite stops the run, naming it (a missing one only
    leaves examples out); every copy of a folder-layout database is checked. Returns the databases without tables
    (db_id: the file the schema is read from)."""
    tableless = {}
    for db_id in sorted({e["db_id"] for e in examples}):
        schema_file = database_path(databases.database_dir, db_id)
        for path in database_files(databases.database_dir, db_id) or []:
            problem = sqlite_file_problem(path)
            if problem:
                raise UserError(f"{path} (database {db_id!r} of {source}) {problem}")
            if _table_count(path, db_id, source) == 0 and path == schema_file:
                tableless[db_id] = path
    return tableless


def _table_count(path: Path, db_id: str, source: Path) -> int:
    """How many tables the database has, read read-only; a damaged file is an error naming it."""
    from custom_metrics.safe_sqlite import run_query

    result = run_query(path, "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
                       30.0)
    if not result.ok:
        raise UserError(f"{path} (database {db_id!r} of {source}) cannot be read as SQLite ({result.message}); "
                        "replace it with an intact copy")
    return result.rows[0][0]


def _report_tableless(path: Path, total: int, tableless: dict[str, Path], counts: Counter) -> None:
    """One warning per database without tables, naming it and how many examples of the file it leaves out."""
    for db_id, db_file in sorted(tableless.items()):
        log.warning("%s: %d of %d examples left out, their database %r (%s) has no tables, so there is no schema to "
                    "answer from; add its tables, or remove those examples", path, counts[db_id], total, db_id, db_file)


def _report_left_out(path: Path, database_dir: Path, total: int, no_db: Counter, failing: list[str],
                     repeated: list[str]) -> None:
    """Warn about the examples of a user's file that are left out, and why."""
    if no_db:
        log.warning("%s: %d of %d examples left out, their db_id has no database in %s (neither <db_id>/<db_id>.sqlite "
                    "nor <db_id>.sqlite): %s", path, sum(no_db.values()), total, database_dir, dict(sorted(no_db.items())))
    if failing:
        log.warning("%s: %d of %d examples left out, their gold query fails on its database: %s%s", path, len(failing),
                    total, "; ".join(failing[:SHOWN_PROBLEMS]), " ..." if len(failing) > SHOWN_PROBLEMS else "")
    if repeated:
        log.warning("%s: %d examples left out, the same db_id and question as an earlier one: %s%s", path,
                    len(repeated), "; ".join(repeated[:SHOWN_PROBLEMS]), " ..." if len(repeated) > SHOWN_PROBLEMS else "")


def _check_unique_names(paths: Sequence[Path]) -> None:
    """Evaluation sets are stored and reported by their file's stem: two files with the same stem are an error."""
    seen: dict[str, Path] = {}
    for path in map(Path, paths):
        if path.stem in seen:
            raise UserError(f"{EVAL_SETTING}: {seen[path.stem]} and {path} would both be reported as {path.stem!r} "
                            "(the file's stem); rename one of them")
        seen[path.stem] = path
