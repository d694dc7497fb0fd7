"""The databases of a data source: where each db_id's file is (SpiderLayout), the SQLite check, the schema text.

A database is <db_id>/<db_id>.sqlite (or <db_id>.sqlite) under a folder; it counts when its file starts with the
SQLite header. Databases are only ever opened read-only (custom_metrics/safe_sqlite.py), a WAL database at its
committed state (its -wal included).
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from custom_metrics.execution_accuracy import database_path
from custom_metrics.safe_sqlite import database_version, open_read_only
from scripts.errors import UserError

SQLITE_HEADER = b"SQLite format 3\x00"
MAX_VALUE_CHARS = 40  # sample-row values longer than this are cut
SCHEMA_TIMEOUT_S = 60.0  # reading a schema (and sample rows) takes milliseconds; this bounds a damaged file


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
        return path if path is not None and is_sqlite_file(path) else None


def databases_layout(database_dir: Path) -> SpiderLayout:
    """A layout of databases only (the user's PATH_DATABASES): no tables.json, no split files."""
    return SpiderLayout(root=Path(database_dir), database_dir=Path(database_dir), tables_file=None)


def is_sqlite_file(path: Path) -> bool:
    """True when path is a readable file that starts with the SQLite header (not a git-LFS pointer, not empty)."""
    return sqlite_file_problem(path) is None


def sqlite_file_problem(path: Path) -> str | None:
    """What keeps path from being read as an SQLite file, with the fix (for a message naming it), or None."""
    try:
        with Path(path).open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return "is not found; restore the file or remove the examples of that db_id"
    except OSError as e:  # permission, a folder, an I/O error: the file is there but cannot be read
        return (f"cannot be read ({e.strerror or e}); give this user read permission on it (chmod a+r), or remove "
                "the examples of that db_id")
    if header != SQLITE_HEADER:
        return ("is not an SQLite database (no SQLite header: empty, another format or a git-LFS pointer); replace "
                "it with the SQLite file, or remove the examples of that db_id")
    return None


# --- schema text ---------------------------------------------------------------------------------------

def schema_text(db_path: Path, sample_rows: int = 0) -> str:
    """The database's CREATE TABLE statements, each followed by up to sample_rows INSERT lines (cached)."""
    path = Path(db_path).resolve()
    problem = sqlite_file_problem(path)
    if problem:
        raise UserError(f"{path} {problem}")
    return _schema_text_cached(str(path), database_version(path), int(sample_rows))


@lru_cache(maxsize=1024)
def _schema_text_cached(path: str, version: tuple, sample_rows: int) -> str:
    """schema_text for one version of one database file, read through safe_sqlite's read-only connection."""
    try:
        con, guard = open_read_only(path)  # immutable, read-only: the file is never changed, no journal is created
    except (OSError, sqlite3.Error) as e:  # e.g. its -wal cannot be read to make the private copy
        raise UserError(f"{path} cannot be opened ({e}); make it and its -wal file readable, or remove its "
                        "examples") from None
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
