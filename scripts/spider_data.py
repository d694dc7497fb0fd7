"""Stage 1: find, unpack (once) and validate spider_data.zip; load splits; schema text.

`prepare_spider(zip_path, extract_dir)` accepts a zip (top folder `spider_data/`, any other folder, or the
files at the top level) or an already unpacked folder. A zip is unpacked into `extract_dir` once: a marker
file records the zip's size and mtime, and a changed zip is unpacked again. Missing databases are not
fatal: `missing_databases` counts the examples per db_id that cannot be executed.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import sqlite3
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tqdm.auto import tqdm

from scripts import distributed
from scripts.errors import UserError

log = logging.getLogger(__name__)

MARKER_NAME = ".unpacked_from.json"
SPLIT_FILES = {"train": ("train_spider.json", "train_others.json"), "dev": ("dev.json",)}
REQUIRED_FILES = ("train_spider.json", "dev.json", "tables.json")
REQUIRED_FIELDS = ("question", "query", "db_id")
SQLITE_HEADER = b"SQLite format 3\x00"
MAX_VALUE_CHARS = 40  # sample-row values longer than this are cut
ROOT_SEARCH_DEPTH = 3
FIX_HINT = "get the official Spider release (https://yale-lily.github.io/spider) and point PATH_SPIDER_ZIP at it"


@dataclass(frozen=True)
class SpiderLayout:
    """Where the files of one validated Spider copy are."""

    root: Path
    database_dir: Path
    tables_file: Path
    split_files: dict[str, list[Path]] = field(default_factory=dict)

    def db_path(self, db_id: str) -> Path | None:
        """database/<db_id>/<db_id>.sqlite when it exists and is an SQLite file, else None."""
        path = self.database_dir / db_id / f"{db_id}.sqlite"
        return path if _is_sqlite_file(path) else None


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


def prepare_stage(settings) -> SpiderLayout:
    """Stage 1 for main.py: prepare Spider from the settings and log what is there and what is missing."""
    with distributed.main_process_first():  # under accelerate launch the main process unpacks, the others find it done
        layout = prepare_spider(settings.spider_zip, settings.data_dir)
    if not distributed.is_main():
        return layout
    for split in ("train", "dev"):
        examples = load_split(layout, split)
        missing = missing_databases(layout, examples)
        log.info("Spider %s: %d examples over %d databases (%s)", split, len(examples),
                 len({e["db_id"] for e in examples}), ", ".join(p.name for p in layout.split_files[split]))
        if missing:
            log.warning("Spider %s: %d examples have no database (not executable, excluded from EX): %s",
                        split, sum(missing.values()), missing)
    return layout


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
    _extract(zip_path, staging)
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


def read_examples(path: Path) -> list[dict]:
    """The examples of one split file, each checked for question/query/db_id (parsed once per file version)."""
    stat = path.stat()
    return _read_examples_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _read_examples_cached(path: str, size: int, mtime_ns: int) -> list[dict]:
    """read_examples, keyed on the file's size and mtime so that an edited file is read again."""
    data = read_json(Path(path))
    if not isinstance(data, list):
        raise UserError(f"{path} should hold a JSON list of examples, found {type(data).__name__}; {FIX_HINT}")
    for i, entry in enumerate(data):
        lacking = [k for k in REQUIRED_FIELDS if not isinstance(entry, dict) or not isinstance(entry.get(k), str)]
        if lacking:
            raise UserError(f"{path}: entry {i} lacks {', '.join(lacking)} (each example needs question, query "
                            f"and db_id as strings); fix or remove that entry")
    return data


def read_json(path: Path):
    """A JSON file; malformed JSON is a UserError naming the file, line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                        f"fix the file or get a fresh copy ({FIX_HINT})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); get a fresh copy ({FIX_HINT})") from None


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
    """schema_text for one version of one database file."""
    con = sqlite3.connect(Path(path).as_uri() + "?mode=ro", uri=True)
    con.text_factory = lambda b: b.decode("utf-8", errors="replace")  # some Spider dbs hold non-UTF-8 text
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
