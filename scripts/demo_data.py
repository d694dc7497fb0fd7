"""Builds the bundled demo data set (Spider layout + MMLU CSV layout) from the text files in data/demo/.

Sources (in git, text only): data/demo/databases/<db_id>.sql, data/demo/train.json, data/demo/dev.json,
data/demo/mmlu/{dev,test}/<subject>_{dev,test}.csv. `build_demo_data(out_dir)` writes
out_dir/spider_data/ (train_spider.json, dev.json, tables.json, database/<db_id>/<db_id>.sqlite),
out_dir/spider_data.zip (top folder spider_data/) and out_dir/mmlu/. The build is deterministic, and a
second call with unchanged sources writes nothing, so the zip keeps its mtime and is not unpacked again.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import shutil
import sqlite3
import zipfile
from pathlib import Path

from scripts.errors import UserError

log = logging.getLogger(__name__)

DEMO_SOURCE = Path(__file__).resolve().parent.parent / "data" / "demo"
BUILD_VERSION = "1"  # change when the build writes different output for the same sources
STAMP_NAME = ".demo_source.sha256"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates keep the zip byte-identical between builds
MMLU_SPLITS = ("dev", "test")
SPLITS = {"train.json": "train_spider.json", "dev.json": "dev.json"}


def build_demo_data(out_dir: Path, source_dir: Path = DEMO_SOURCE) -> tuple[Path, Path]:
    """Build the demo's Spider folder, its zip and the MMLU folder under out_dir; returns (zip, mmlu_dir)."""
    out_dir, source_dir = Path(out_dir), Path(source_dir)
    zip_path, mmlu_dir, spider_dir = out_dir / "spider_data.zip", out_dir / "mmlu", out_dir / "spider_data"
    stamp = source_fingerprint(source_dir)
    stamp_file = out_dir / STAMP_NAME
    if stamp_file.is_file() and stamp_file.read_text() == stamp and zip_path.is_file() and mmlu_dir.is_dir():
        return zip_path, mmlu_dir
    log.info("building the demo data set from %s into %s", source_dir, out_dir)
    shutil.rmtree(spider_dir, ignore_errors=True)
    shutil.rmtree(mmlu_dir, ignore_errors=True)
    databases = build_databases(source_dir / "databases", spider_dir / "database")
    write_if_changed(spider_dir / "tables.json", _json_bytes([tables_entry(db_id, path) for db_id, path in databases.items()]))
    for source_name, target_name in SPLITS.items():
        examples = read_demo_examples(source_dir / source_name, set(databases))
        write_if_changed(spider_dir / target_name, _json_bytes(examples))
    copy_mmlu(source_dir / "mmlu", mmlu_dir)
    write_if_changed(zip_path, zip_bytes(spider_dir, "spider_data"))
    stamp_file.write_text(stamp)
    return zip_path, mmlu_dir


def source_fingerprint(source_dir: Path) -> str:
    """sha256 of every source file (path and bytes), the build version and the SQLite version."""
    if not source_dir.is_dir():
        raise UserError(f"demo sources not found: {source_dir} does not exist; restore data/demo/ from git")
    digest = hashlib.sha256(f"{BUILD_VERSION} {sqlite3.sqlite_version}".encode())
    for path in sorted(p for p in source_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(source_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write data unless the file already holds exactly these bytes; True when written."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def _json_bytes(value) -> bytes:
    """Stable, readable JSON."""
    return (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


# --- databases -----------------------------------------------------------------------------------------

def build_databases(sql_dir: Path, database_dir: Path) -> dict[str, Path]:
    """database/<db_id>/<db_id>.sqlite from each <db_id>.sql (foreign keys checked); {db_id: path}."""
    sql_files = sorted(sql_dir.glob("*.sql"))
    if not sql_files:
        raise UserError(f"no .sql files in {sql_dir}; restore data/demo/databases/ from git")
    databases = {}
    for sql_file in sql_files:
        db_id = sql_file.stem
        path = database_dir / db_id / f"{db_id}.sqlite"
        write_if_changed(path, sqlite_bytes(sql_file))
        databases[db_id] = path
    return databases


def sqlite_bytes(sql_file: Path) -> bytes:
    """The SQLite file built from one .sql script, as bytes (built in memory: same script, same bytes)."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(sql_file.read_text(encoding="utf-8"))
        broken = con.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise UserError(f"{sql_file}: rows break foreign keys {broken[:3]} (table, rowid, parent, fk index); fix them")
        return con.serialize()
    except sqlite3.Error as e:
        raise UserError(f"{sql_file} does not run in SQLite ({e}); fix the statement") from None
    finally:
        con.close()


def tables_entry(db_id: str, db_path: Path) -> dict:
    """One database's entry in Spider's tables.json format, read from the SQLite file."""
    con = sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
        columns: list[list] = [[-1, "*"]]
        types = ["text"]
        primary_keys: list = []
        index: dict[tuple[str, str], int] = {}
        for t, table in enumerate(tables):
            info = con.execute(f'PRAGMA table_info("{table}")').fetchall()  # cid, name, type, notnull, default, pk
            for _, name, declared, _, _, _ in info:
                index[(table.lower(), name.lower())] = len(columns)
                columns.append([t, name])
                types.append(spider_type(declared))
            keys = [index[(table.lower(), row[1].lower())] for row in sorted(info, key=lambda r: r[5]) if row[5]]
            if keys:
                primary_keys.append(keys[0] if len(keys) == 1 else keys)
        foreign_keys = []
        for table in tables:
            for row in con.execute(f'PRAGMA foreign_key_list("{table}")').fetchall():  # id, seq, table, from, to, ...
                parent, child_col, parent_col = row[2], row[3], row[4] or _single_primary_key(con, row[2])
                foreign_keys.append([index[(table.lower(), child_col.lower())], index[(parent.lower(), parent_col.lower())]])
    finally:
        con.close()
    return {
        "db_id": db_id,
        "table_names_original": tables,
        "table_names": [natural_name(t) for t in tables],
        "column_names_original": columns,
        "column_names": [[t, natural_name(c) if t >= 0 else c] for t, c in columns],
        "column_types": types,
        "primary_keys": primary_keys,
        "foreign_keys": foreign_keys,
    }


def _single_primary_key(con: sqlite3.Connection, table: str) -> str:
    """The primary-key column a foreign key without a column list refers to."""
    return next(row[1] for row in con.execute(f'PRAGMA table_info("{table}")') if row[5] == 1)


def spider_type(declared: str) -> str:
    """Spider's column type (text, number, time, boolean, others) for an SQLite declared type."""
    kind = declared.lower()
    if any(word in kind for word in ("int", "real", "num", "dec", "float", "double")):
        return "number"
    if any(word in kind for word in ("date", "time", "year")):
        return "time"
    if "bool" in kind:
        return "boolean"
    if any(word in kind for word in ("char", "text", "clob")):
        return "text"
    return "others"


def natural_name(name: str) -> str:
    """Spider's readable name: 'pub_year' -> 'pub year', 'orderItem' -> 'order item'."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ")
    return " ".join(spaced.lower().split())


# --- examples and MMLU ---------------------------------------------------------------------------------

def read_demo_examples(path: Path, db_ids: set[str]) -> list[dict]:
    """A demo split file: a JSON list of {question, query, db_id} whose db_id has a .sql file."""
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; restore data/demo/ from git") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; fix it") from None
    for i, example in enumerate(examples, 1):  # entries counted from 1, as the user's files are
        if not all(isinstance(example.get(k), str) for k in ("question", "query", "db_id")):
            raise UserError(f"{path}: entry {i} needs question, query and db_id strings; fix it")
        if example["db_id"] not in db_ids:
            raise UserError(f"{path}: entry {i} uses db_id {example['db_id']!r}, which has no "
                            f"data/demo/databases/{example['db_id']}.sql; add the database or fix the db_id")
    return [{"db_id": e["db_id"], "question": e["question"], "query": e["query"]} for e in examples]


def copy_mmlu(source: Path, target: Path) -> None:
    """Check and copy the MMLU CSVs (no header; question, A, B, C, D, answer letter) split by split."""
    for split in MMLU_SPLITS:
        files = sorted((source / split).glob(f"*_{split}.csv"))
        if not files:
            raise UserError(f"no MMLU CSVs in {source / split}; restore data/demo/mmlu/ from git")
        for path in files:
            check_mmlu_csv(path)
            write_if_changed(target / split / path.name, path.read_bytes())


def check_mmlu_csv(path: Path) -> int:
    """Number of rows of an MMLU CSV; a row without 6 fields or with an answer outside A-D is a UserError."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    for n, row in enumerate(rows, start=1):
        if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
            raise UserError(f"{path} row {n}: expected 6 fields (question, A, B, C, D, answer letter A-D), "
                            f"got {row!r}; fix that row")
    return len(rows)


def zip_bytes(folder: Path, top: str) -> bytes:
    """A deterministic zip of folder's files under top/ (sorted names, fixed dates and permissions)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"{top}/{path.relative_to(folder).as_posix()}", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()
