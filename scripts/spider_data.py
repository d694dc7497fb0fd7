"""Stage 1: the data sets and their databases, every input checked: Spider (unpacked once) or the user's own.

`prepare_spider(zip_path, extract_dir)` accepts a zip (top folder `spider_data/`, any other folder, or the
files at the top level) or an already unpacked folder. A zip is unpacked into a staging folder and validated
there, then moved into `extract_dir` (a rejected zip leaves nothing behind); a marker file records the zip's
size and mtime, and a changed zip is unpacked again. Missing Spider databases are not fatal:
`missing_databases` counts the examples per db_id that cannot be executed.

`prepare_stage(settings)` gives the run's `RunData`: the train set (the user's PATH_FT_DATASET, else Spider
train) and the evaluation sets (the user's PATH_TASK_EVAL_DATASET files, else Spider dev), each a `DataSet`
with the databases it runs on (PATH_DATABASES, else Spider's database folder). Spider is unpacked only when
something comes from it. A user's file is a JSON list or JSON lines of {question, query, db_id}; its examples
without a database and those whose gold query fails on its database are reported and left out, and a database
file that is not SQLite stops the run. Databases are only ever opened read-only (custom_metrics/safe_sqlite.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import sqlite3
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tqdm.auto import tqdm

from custom_metrics.execution_accuracy import DB_MISSING, OK, check_golds, database_files, database_path
from scripts import distributed
from scripts.errors import UserError
from scripts.store import data_fingerprint

log = logging.getLogger(__name__)

MARKER_NAME = ".unpacked_from.json"
SPLIT_FILES = {"train": ("train_spider.json", "train_others.json"), "dev": ("dev.json",)}
SPIDER_SET_NAMES = {"train": "spider_train", "dev": "spider_dev"}
REQUIRED_FILES = ("train_spider.json", "dev.json", "tables.json")
REQUIRED_FIELDS = ("question", "query", "db_id")
SQLITE_HEADER = b"SQLite format 3\x00"
MAX_VALUE_CHARS = 40  # sample-row values longer than this are cut
ROOT_SEARCH_DEPTH = 3
SCHEMA_TIMEOUT_S = 60.0  # reading a schema (and sample rows) takes milliseconds; this bounds a damaged file
SHOWN_PROBLEMS = 5  # examples named in a warning about left-out examples
FIX_HINT = "get the official Spider release (https://yale-lily.github.io/spider) and point PATH_SPIDER_ZIP at it"
USER_FIX = "see README, Bring your own data"
TRAIN_SETTING = "PATH_FT_DATASET (--ft-dataset)"
EVAL_SETTING = "PATH_TASK_EVAL_DATASET (--eval-dataset)"
DATABASES_SETTING = "PATH_DATABASES (--databases)"
EX_STAGES = ("baseline_ex", "eval_adapters")


@dataclass(frozen=True)
class SpiderLayout:
    """Where one data source's files are: a validated Spider copy, or the user's database folder alone."""

    root: Path
    database_dir: Path
    tables_file: Path | None
    split_files: dict[str, list[Path]] = field(default_factory=dict)

    def db_path(self, db_id: str) -> Path | None:
        """<db_id>/<db_id>.sqlite (or <db_id>.sqlite) under database_dir when it is an SQLite file, else None."""
        path = database_path(self.database_dir, db_id)
        return path if path is not None and _is_sqlite_file(path) else None


def databases_layout(database_dir: Path) -> SpiderLayout:
    """A layout of databases only (the user's PATH_DATABASES): no tables.json, no split files."""
    return SpiderLayout(root=Path(database_dir), database_dir=Path(database_dir), tables_file=None)


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

def prepare_spider(zip_path: Path, extract_dir: Path) -> SpiderLayout:
    """Unpack the zip into extract_dir once (or use an unpacked folder) and validate the Spider layout."""
    source = Path(zip_path)
    if source.is_dir():
        return validate_layout(find_root(source, source))
    if not source.is_file():
        raise UserError(f"Spider data not found: {source} does not exist; put spider_data.zip there, "
                        f"or set PATH_SPIDER_ZIP (or --spider-zip) to the zip or to an unpacked folder ({FIX_HINT})")
    unpack_once(source, Path(extract_dir))
    return validate_layout(find_root(Path(extract_dir), source))


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
    """A user's train or evaluation file, checked: examples without a database or with a failing gold left out.

    `unique` (evaluation sets) also leaves out a repeated (db_id, question): the store keys an answer by them.
    """
    path = Path(path)
    examples, places = read_user_examples(path, setting)
    _check_database_files(examples, databases, path)
    outcomes = check_golds([e["query"] for e in examples], [e["db_id"] for e in examples], databases.database_dir,
                           timeout=timeout)
    kept, no_db, failing, repeated, seen = [], Counter(), [], [], {}
    for place, example, outcome in zip(places, examples, outcomes):
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
        _report_left_out(path, databases.database_dir, len(examples), no_db, failing, repeated)
    if not kept:
        raise UserError(f"{setting}: no example of {path} can be used ({sum(no_db.values())} without a database in "
                        f"{databases.database_dir}, {len(failing)} with a failing gold query); fix the file or "
                        f"{DATABASES_SETTING} ({USER_FIX})")
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


def load_split(layout: SpiderLayout, split: str) -> list[dict]:
    """The examples of a split ("train": train_spider + train_others when present; "dev"), as fresh dicts."""
    if split not in layout.split_files:
        raise UserError(f"unknown Spider split {split!r}; choose from {sorted(layout.split_files)}")
    examples: list[dict] = []
    for path in layout.split_files[split]:
        examples.extend(dict(e) for e in read_examples(path))
    return examples


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
    """sha256 of each file a query of db_id runs on (None when it has no database)."""
    files = database_files(database_dir, db_id)
    if files is None:
        return None
    return [_file_sha256(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


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


def _check_database_files(examples: list[dict], databases: SpiderLayout, source: Path) -> None:
    """A database file that exists but is not SQLite stops the run, naming it (a missing one only leaves examples out)."""
    for db_id in sorted({e["db_id"] for e in examples}):
        path = database_path(databases.database_dir, db_id)
        if path is not None and not _is_sqlite_file(path):
            raise UserError(f"{path} (database {db_id!r} of {source}) is not an SQLite database (no SQLite header: "
                            "empty, another format or a git-LFS pointer); replace it with the SQLite file, or "
                            "remove the examples of that db_id")
        if path is not None:
            _check_readable(path, db_id, source)


def _check_readable(path: Path, db_id: str, source: Path) -> None:
    """The database's schema can be read (read-only); a damaged file is an error naming it."""
    from custom_metrics.safe_sqlite import run_query

    result = run_query(path, "SELECT count(*) FROM sqlite_master", 30.0)
    if not result.ok:
        raise UserError(f"{path} (database {db_id!r} of {source}) cannot be read as SQLite ({result.message}); "
                        "replace it with an intact copy")


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


# --- unpacking -----------------------------------------------------------------------------------------

def unpack_once(zip_path: Path, extract_dir: Path) -> bool:
    """Unpack zip_path into extract_dir unless the marker says this same zip is there; True when it unpacked."""
    stamp = zip_stamp(zip_path)
    marker = extract_dir / MARKER_NAME
    if marker.is_file() and _read_marker(marker) == stamp:
        log.info("Spider already unpacked in %s", extract_dir)
        return False
    if extract_dir.exists() and any(extract_dir.iterdir()) and not marker.is_file():
        raise UserError(f"{extract_dir} exists and was not unpacked by this pipeline; delete it, or set "
                        f"PATH_SPIDER_ZIP to that folder to use it as it is")
    staging = extract_dir.with_name(extract_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted unpack
    created = [p for p in staging.parents if not p.exists()]  # folders to remove again if the zip is rejected
    try:
        _extract(zip_path, staging)
        validate_layout(find_root(staging, zip_path))
    except UserError as e:  # validated before it is moved into place: a rejected zip leaves nothing behind
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # nearest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise UserError(str(e).replace(f"{staging}/", f"{zip_path}: ")) from None
    (staging / MARKER_NAME).write_text(json.dumps(stamp))
    shutil.rmtree(extract_dir, ignore_errors=True)  # ours (it has a marker) or empty
    extract_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(extract_dir)
    return True


def zip_stamp(zip_path: Path) -> dict:
    """What identifies one version of the zip: name, size and modification time."""
    stat = zip_path.stat()
    return {"zip": zip_path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_marker(marker: Path) -> dict | None:
    """The stamp saved by the last unpack, or None when unreadable."""
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _extract(zip_path: Path, target: Path) -> None:
    """Extract every member (macOS metadata skipped) with a progress bar; a damaged zip is a UserError."""
    damaged = (f"{zip_path} is damaged ({{}}); download spider_data.zip again, or unzip it yourself and "
               f"set PATH_SPIDER_ZIP to the unpacked folder")
    if not zipfile.is_zipfile(zip_path):
        raise UserError(f"{zip_path} is not a zip file (or is truncated); download spider_data.zip again, "
                        f"or set PATH_SPIDER_ZIP to an unpacked Spider folder")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [m for m in archive.infolist() if not m.filename.startswith("__MACOSX/")]
            total = sum(m.file_size for m in members)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"unpacking {zip_path.name}") as bar:
                for member in members:
                    archive.extract(member, target)
                    bar.update(member.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(damaged.format(e)) from None
    except OSError as e:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"could not unpack {zip_path} into {target} ({e}); free disk space or set "
                        f"PATH_SPIDER_ZIP to an unpacked Spider folder") from None


# --- validation ----------------------------------------------------------------------------------------

def find_root(folder: Path, source: Path) -> Path:
    """The folder holding dev.json: folder itself or the shallowest one below it (first by name)."""
    for depth in range(ROOT_SEARCH_DEPTH + 1):
        pattern = "/".join(["*"] * depth + ["dev.json"])
        hits = sorted(p.parent for p in folder.glob(pattern) if "__MACOSX" not in p.parts)
        if hits:
            return hits[0]
    raise UserError(f"{source} holds no dev.json; expected the official Spider layout (train_spider.json, "
                    f"dev.json, tables.json, database/<db_id>/<db_id>.sqlite): {FIX_HINT}")


def validate_layout(root: Path) -> SpiderLayout:
    """Check the official layout and every split file's entries; return the layout."""
    for name in REQUIRED_FILES:
        if not (root / name).is_file():
            raise UserError(f"{root / name} is missing: the Spider folder needs {', '.join(REQUIRED_FILES)} "
                            f"and database/; {FIX_HINT}")
    database_dir = root / "database"
    if not database_dir.is_dir():
        raise UserError(f"{database_dir} is missing (it should hold <db_id>/<db_id>.sqlite); {FIX_HINT}")
    split_files = {
        split: [root / name for name in names if (root / name).is_file()] for split, names in SPLIT_FILES.items()
    }
    for paths in split_files.values():
        for path in paths:
            read_examples(path)
    _validate_tables(root / "tables.json")
    return SpiderLayout(root=root, database_dir=database_dir, tables_file=root / "tables.json", split_files=split_files)


def read_examples(path: Path, fix: str = FIX_HINT) -> list[dict]:
    """The examples of one file (a JSON list, or JSON lines), each checked for question/query/db_id."""
    return read_examples_and_places(path, fix)[0]


def read_examples_and_places(path: Path, fix: str = FIX_HINT) -> tuple[list[dict], tuple[str, ...]]:
    """read_examples, and where each example is in the file ("entry 3" of a list, "line 4" of JSON lines)."""
    stat = path.stat()
    return _read_examples_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, fix)


@lru_cache(maxsize=8)
def _read_examples_cached(path: str, size: int, mtime_ns: int, fix: str) -> tuple[list[dict], tuple[str, ...]]:
    """read_examples_and_places, keyed on the file's size and mtime so that an edited file is read again."""
    text = _read_text(Path(path), fix)
    if text.lstrip().startswith("["):
        data = _parse_json(Path(path), text, fix)
        places = tuple(f"entry {i}" for i in range(len(data) if isinstance(data, list) else 0))
    else:  # JSON lines: an entry is named by its line
        data = _parse_json_lines(Path(path), text, fix)
        places = tuple(f"line {n}" for n, line in enumerate(text.splitlines(), 1) if line.strip())
    if not isinstance(data, list):
        raise UserError(f"{path} should hold a JSON list of examples, found {type(data).__name__}; {fix}")
    for place, entry in zip(places, data):
        lacking = [k for k in REQUIRED_FIELDS
                   if not isinstance(entry, dict) or not isinstance(entry.get(k), str) or not entry[k].strip()]
        if lacking:
            raise UserError(f"{path}: {place} lacks {', '.join(lacking)} (each example needs question, query and "
                            "db_id as non-empty strings; other fields are ignored); fix or remove that entry")
    return data, places


def _parse_json_lines(path: Path, text: str, fix: str) -> list:
    """One JSON value per non-blank line."""
    data = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n} is not valid JSON ({e.msg}, column {e.colno}); the file should be a JSON "
                            f"list, or JSON lines with one example object per line; {fix}") from None
    return data


def read_json(path: Path, fix: str = FIX_HINT):
    """A JSON file; malformed JSON is a UserError naming the file, line and column."""
    return _parse_json(path, _read_text(path, fix), fix)


def _read_text(path: Path, fix: str) -> str:
    """A UTF-8 text file; anything else is a UserError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 ({fix})") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None


def _parse_json(path: Path, text: str, fix: str):
    """JSON text of a file; malformed JSON is a UserError naming the file, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                        f"fix the file ({fix})") from None


def _validate_tables(path: Path) -> None:
    """tables.json must be a list of entries with a db_id."""
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(e, dict) and "db_id" in e for e in data):
        raise UserError(f"{path} should be a JSON list of schema entries with a db_id each; {FIX_HINT}")


def _is_sqlite_file(path: Path) -> bool:
    """True when path is a file that starts with the SQLite header (not a git-LFS pointer, not empty)."""
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


# --- schema text ---------------------------------------------------------------------------------------

def schema_text(db_path: Path, sample_rows: int = 0) -> str:
    """The database's CREATE TABLE statements, each followed by up to sample_rows INSERT lines (cached)."""
    path = Path(db_path).resolve()
    if not _is_sqlite_file(path):
        raise UserError(f"{path} is not an SQLite database (missing, empty or a git-LFS pointer); "
                        f"restore the file or remove its examples")
    return _schema_text_cached(str(path), path.stat().st_mtime_ns, int(sample_rows))


@lru_cache(maxsize=1024)
def _schema_text_cached(path: str, mtime_ns: int, sample_rows: int) -> str:
    """schema_text for one version of one database file, read through safe_sqlite's read-only connection."""
    from custom_metrics.safe_sqlite import open_read_only

    con, guard = open_read_only(path)  # immutable, read-only: the file is never changed, no journal is created
    con.text_factory = lambda b: b.decode("utf-8", errors="replace")  # some Spider dbs hold non-UTF-8 text
    guard.deadline = time.monotonic() + SCHEMA_TIMEOUT_S
    try:
        tables = con.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
        ).fetchall()
        parts = []
        for name, sql in tables:
            parts.append(_tidy_statement(sql))
            if sample_rows > 0:
                rows = con.execute(f"SELECT * FROM {_quote_identifier(name)} LIMIT ?", (sample_rows,)).fetchall()
                parts.extend(_insert_line(name, row) for row in rows)
        return "\n".join(parts)
    except sqlite3.Error as e:
        raise UserError(f"the schema of {path} cannot be read ({e}); replace the database with an intact copy, "
                        "or remove its examples") from None
    finally:
        con.close()


def _tidy_statement(sql: str) -> str:
    """A CREATE statement without blank lines or trailing spaces, ending in `;`."""
    lines = [line.rstrip() for line in sql.strip().splitlines() if line.strip()]
    text = "\n".join(lines)
    return text if text.endswith(";") else text + ";"


def _insert_line(table: str, row: tuple) -> str:
    """One sample row as an INSERT statement, long values cut."""
    return f"INSERT INTO {_quote_identifier(table)} VALUES ({', '.join(_sql_literal(v) for v in row)});"


def _sql_literal(value) -> str:
    """A short SQL literal for a sample value."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return "X'" + value[: MAX_VALUE_CHARS // 2].hex() + ("...'" if len(value) > MAX_VALUE_CHARS // 2 else "'")
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\n", " ")
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + "..."
    return "'" + text.replace("'", "''") + "'"


def _quote_identifier(name: str) -> str:
    """An identifier in double quotes (Spider has table names with spaces and keywords)."""
    return '"' + name.replace('"', '""') + '"'
