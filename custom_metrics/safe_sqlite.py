"""Read-only, time-limited, size-capped execution of untrusted SQL against SQLite files.

Defences, each enforced by SQLite itself rather than by looking at the SQL text:
- the file is opened through a URI with ``mode=ro&immutable=1``: a missing path is never created;
- immutable ignores a ``-wal`` file, so a WAL database whose ``-wal`` holds committed changes is read from a
  private copy of both, checkpointed in this process's temporary folder (made once per version, removed at
  exit): the user's files are only ever read;
- an authorizer allows only reading actions (SELECT, READ, RECURSIVE and functions other than
  ``load_extension``); writes, ATTACH, VACUUM, PRAGMA, transactions and temp objects are denied;
- ``SQLITE_LIMIT_ATTACHED = 0`` and ``enable_load_extension(False)`` as a second line;
- a progress handler aborts the statement once its deadline has passed;
- ``SQLITE_LIMIT_LENGTH`` caps every value; the fetch loop caps the row count and the total size.
"""
from __future__ import annotations

import atexit
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

MAX_ROWS = 100_000
MAX_VALUE_BYTES = 1_000_000
MAX_TOTAL_BYTES = 64_000_000
PROGRESS_STEPS = 1_000  # SQLite VM instructions between two deadline checks
_FETCH_BATCH = 1_000
_CACHED_CONNECTIONS = 8

_ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE})
_DENIED_FUNCTIONS = frozenset({"load_extension"})

# error classes (shared with execution_accuracy)
OK = "ok"
SYNTAX_ERROR = "syntax_error"
UNKNOWN_TABLE_OR_COLUMN = "unknown_table_or_column"
TIMEOUT = "timeout"
NOT_READ_ONLY = "not_read_only"
TOO_LARGE = "too_large"
EXEC_ERROR = "exec_error"


@dataclass
class QueryResult:
    """Rows of one query (and its column names), or the error class and SQLite's message."""

    rows: list[tuple] | None
    error: str = OK
    message: str = ""
    columns: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the query ran and returned rows (possibly none)."""
        return self.error == OK


@dataclass
class _Guard:
    """Per-connection state read by the authorizer and the progress handler."""

    deadline: float = 0.0
    denied: list[str] = field(default_factory=list)

    def authorize(self, action: int, arg1, arg2, db_name, trigger) -> int:
        """sqlite3 authorizer: allow reading actions only, remember what was denied."""
        if action in _ALLOWED_ACTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() not in _DENIED_FUNCTIONS:
            return sqlite3.SQLITE_OK
        self.denied.append(f"action {action} ({arg1}, {arg2})")
        return sqlite3.SQLITE_DENY

    def past_deadline(self) -> int:
        """sqlite3 progress handler: non-zero aborts the running statement."""
        return 1 if time.monotonic() > self.deadline else 0


def _decode_text(data: bytes) -> str:
    """Text decoding of the official Spider evaluator (invalid bytes dropped)."""
    return data.decode(errors="ignore")


def wal_file(path: str | Path) -> Path:
    """The write-ahead log SQLite keeps beside a database in WAL mode: `<name>-wal`."""
    path = Path(path)
    return path.with_name(path.name + "-wal")


def pending_wal(path: str | Path) -> Path | None:
    """The database's -wal file when it holds anything (committed changes its main file may lack), else None."""
    wal = wal_file(path)
    try:
        return wal if wal.stat().st_size > 0 else None
    except FileNotFoundError:
        return None


def database_version(path: str | Path) -> tuple[int, int, int, int]:
    """Size and mtime of a database file and of its -wal (0, 0 without one): what its committed state depends on."""
    main, wal = Path(path).stat(), pending_wal(path)
    wal_stat = (wal.stat().st_size, wal.stat().st_mtime_ns) if wal else (0, 0)
    return (main.st_size, main.st_mtime_ns, *wal_stat)


_copies: dict[tuple, Path] = {}  # (file, version) -> its checkpointed private copy
_copies_lock = threading.Lock()
_COPY_ATTEMPTS = 3  # copies made while a writer changed the files are made again


def committed_file(path: str | Path) -> Path:
    """The file holding the database's committed state: itself, or (its -wal not empty) a private checkpointed copy."""
    path = Path(path).resolve()
    if pending_wal(path) is None:
        return path
    with _copies_lock:
        for _ in range(_COPY_ATTEMPTS):
            key = (str(path), database_version(path))
            if key not in _copies:
                copy = _checkpointed_copy(path)
                if (str(path), database_version(path)) != key:  # written to while copied: the copy may be torn
                    shutil.rmtree(copy.parent, ignore_errors=True)
                    continue
                _copies[key] = copy
            return _copies[key]
        raise sqlite3.OperationalError(f"{path} kept changing while it was copied to be read; stop its writer")


def _checkpointed_copy(path: Path) -> Path:
    """A copy of the database and its -wal in this process's private folder, checkpointed there into one file."""
    folder = Path(tempfile.mkdtemp(dir=_private_folder()))
    copy = folder / path.name
    shutil.copyfile(path, copy)
    shutil.copyfile(wal_file(path), wal_file(copy))
    conn = sqlite3.connect(copy, isolation_level=None)  # read-write, but only on this private copy, only this PRAGMA
    try:
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]  # checkpoints the log, removes it
    finally:
        conn.close()
    if mode != "delete":
        raise sqlite3.OperationalError(f"the write-ahead log of {path} could not be applied to a private copy")
    return copy


_private_dir: Path | None = None


def _private_folder() -> Path:
    """This process's temporary folder for checkpointed copies (created once, removed at exit)."""
    global _private_dir
    if _private_dir is None:
        _private_dir = Path(tempfile.mkdtemp(prefix="text2sql-wal-copies-"))
        atexit.register(shutil.rmtree, _private_dir, ignore_errors=True)
    return _private_dir


def open_read_only(db_path: str | Path) -> tuple[sqlite3.Connection, _Guard]:
    """Open an existing SQLite file read-only with every guard installed; never creates a file.

    A database whose -wal holds committed changes is read from its checkpointed private copy (committed_file)."""
    path = Path(db_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"SQLite database not found: {path}")
    path = committed_file(path)
    conn = sqlite3.connect(
        f"{path.as_uri()}?mode=ro&immutable=1", uri=True, isolation_level=None, check_same_thread=False
    )
    guard = _Guard()
    conn.text_factory = _decode_text
    if hasattr(conn, "enable_load_extension"):  # absent when Python's sqlite3 was built without it
        conn.enable_load_extension(False)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.set_authorizer(guard.authorize)
    conn.set_progress_handler(guard.past_deadline, PROGRESS_STEPS)
    return conn, guard


class ConnectionCache:
    """A few open read-only connections, reused across queries on the same file (LRU)."""

    def __init__(self, size: int = _CACHED_CONNECTIONS) -> None:
        self._size = size
        self._items: OrderedDict[str, tuple[sqlite3.Connection, _Guard]] = OrderedDict()

    def get(self, db_path: str | Path) -> tuple[sqlite3.Connection, _Guard]:
        """The cached connection for this file, opening it when needed."""
        key = str(db_path)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        item = open_read_only(db_path)
        self._items[key] = item
        if len(self._items) > self._size:
            _, (old, _) = self._items.popitem(last=False)
            old.close()
        return item

    def close(self) -> None:
        """Close every cached connection."""
        while self._items:
            _, (conn, _) = self._items.popitem()
            conn.close()


_thread_caches = threading.local()  # a connection's guard holds one query's deadline: one cache per thread


def _default_cache() -> ConnectionCache:
    """This thread's connection cache."""
    if not hasattr(_thread_caches, "cache"):
        _thread_caches.cache = ConnectionCache()
    return _thread_caches.cache


def classify_error(exc: BaseException, guard: _Guard, timed_out: bool) -> str:
    """Map an exception raised while running a query to an error class."""
    message = str(exc).lower()
    if timed_out or (isinstance(exc, sqlite3.OperationalError) and message == "interrupted"):
        return TIMEOUT
    if guard.denied or "readonly database" in message or "not authorized" in message:
        return NOT_READ_ONLY
    if "too big" in message or isinstance(exc, MemoryError):
        return TOO_LARGE
    if "no such table" in message or "no such column" in message:
        return UNKNOWN_TABLE_OR_COLUMN
    if "syntax error" in message or "incomplete input" in message or "unrecognized token" in message:
        return SYNTAX_ERROR
    return EXEC_ERROR


def _value_size(value) -> int:
    """Approximate bytes of one result value."""
    return len(value) if isinstance(value, (str, bytes)) else 8


def _fetch_capped(cursor: sqlite3.Cursor, max_rows: int, max_total_bytes: int) -> list[tuple]:
    """All rows of the cursor; raises OverflowError past the row or size cap."""
    rows: list[tuple] = []
    total = 0
    while True:
        batch = cursor.fetchmany(_FETCH_BATCH)
        if not batch:
            return rows
        rows.extend(batch)
        if len(rows) > max_rows:
            raise OverflowError(f"more than {max_rows} rows")
        total += sum(_value_size(v) for row in batch for v in row)
        if total > max_total_bytes:
            raise OverflowError(f"result larger than {max_total_bytes} bytes")


def run_query(
    db_path: str | Path,
    sql: str,
    timeout: float = 30.0,
    *,
    max_rows: int = MAX_ROWS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    cache: ConnectionCache | None = None,
) -> QueryResult:
    """Run one statement read-only within `timeout` seconds; rows or an error class, never an exception."""
    try:
        conn, guard = (cache or _default_cache()).get(db_path)
    except (OSError, sqlite3.Error) as exc:  # missing, unreadable, or its -wal could not be applied
        return QueryResult(None, EXEC_ERROR, f"cannot open database: {exc}")
    guard.denied.clear()
    guard.deadline = time.monotonic() + timeout
    cursor = conn.cursor()
    try:
        cursor.execute(sql)
        rows = _fetch_capped(cursor, max_rows, max_total_bytes)
        columns = tuple(d[0] for d in cursor.description or ())
    except OverflowError as exc:
        return QueryResult(None, TOO_LARGE, str(exc))
    except (sqlite3.ProgrammingError, sqlite3.Warning) as exc:  # "You can only execute one statement at a time."
        return QueryResult(None, EXEC_ERROR, str(exc))
    except (sqlite3.Error, MemoryError) as exc:
        timed_out = time.monotonic() > guard.deadline
        return QueryResult(None, classify_error(exc, guard, timed_out), str(exc))
    finally:
        cursor.close()
    return QueryResult(rows, columns=columns)


_syntax_only = threading.local()  # an empty in-memory database per thread: names are unknown, grammar is checked


def compile_check(sql: str, db_path: str | Path | None = None) -> QueryResult:
    """Compile one statement without running it (EXPLAIN): no rows, OK or the error class and SQLite's message.

    Against db_path (read-only, guarded as in run_query) names are resolved too; without one only the grammar is
    checked, so an unknown table or column counts as OK.
    """
    if db_path is None:
        if not hasattr(_syntax_only, "conn"):
            _syntax_only.conn = sqlite3.connect(":memory:", check_same_thread=False)
        conn, guard = _syntax_only.conn, _Guard()
    else:
        try:
            conn, guard = _default_cache().get(db_path)
        except (OSError, sqlite3.Error) as exc:
            return QueryResult(None, EXEC_ERROR, f"cannot open database: {exc}")
        guard.denied.clear()
        guard.deadline = time.monotonic() + 5.0  # compiling runs nothing; this only bounds a pathological statement
    try:
        conn.execute("EXPLAIN " + sql).close()
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as exc:
        error = classify_error(exc, guard, False)
        if db_path is None and error != SYNTAX_ERROR and isinstance(exc, sqlite3.OperationalError):
            return QueryResult(None)  # the grammar was accepted; names are unknown in the empty database
        return QueryResult(None, error, str(exc))  # a parameter (`?`, `:x`) without a value is an error too
    return QueryResult(None)
