"""Read-only, time-limited, capped execution: results, error classes, hostile statements change nothing."""
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from custom_metrics.safe_sqlite import ConnectionCache, committed_file, compile_check, run_query

TIMEOUT = 1.0
SLACK = 1.5


def make_db(path: Path) -> Path:
    """A small database: t(x) with 0..999, names(id, name)."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t(x INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    conn.execute("CREATE TABLE names(id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO names VALUES (?, ?)", [(1, "ann"), (2, "bob")])
    conn.execute("INSERT INTO names VALUES (3, CAST(x'41ff42' AS TEXT))")  # invalid UTF-8 in a TEXT value
    conn.execute("CREATE INDEX names_name ON names(name)")
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    folder = tmp_path / "db"
    folder.mkdir()
    return make_db(folder / "db.sqlite")


def snapshot(folder: Path) -> dict:
    """Every file of a folder (recursively) with its bytes and mtime."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_select_returns_rows(db):
    result = run_query(db, "SELECT name FROM names WHERE id <= 2 ORDER BY id")
    assert result.ok and result.rows == [("ann",), ("bob",)]


def test_text_decoded_like_the_official_evaluator(db):
    assert run_query(db, "SELECT name FROM names WHERE id = 3").rows == [("AB",)]


def test_syntax_and_unknown_names_are_classified(db):
    assert run_query(db, "SELEC name FROM names").error == "syntax_error"
    assert run_query(db, "SELECT name FROM nope").error == "unknown_table_or_column"
    assert run_query(db, "SELECT nope FROM names").error == "unknown_table_or_column"


def test_second_statement_is_refused(db):
    result = run_query(db, "SELECT 1; SELECT 2")
    assert result.error == "exec_error" and "one statement" in result.message


def test_a_warning_raised_for_a_second_statement_is_an_error_too(db, monkeypatch):
    """Python 3.10's sqlite3 raises a Warning, not a ProgrammingError, for a second statement."""
    import custom_metrics.safe_sqlite as safe_sqlite

    class Cursor:
        def execute(self, sql):
            raise sqlite3.Warning("You can only execute one statement at a time.")

        def close(self):
            pass

    class Connection:
        def cursor(self):
            return Cursor()

    conn, guard = safe_sqlite._default_cache().get(db)
    monkeypatch.setattr(safe_sqlite._default_cache(), "get", lambda path: (Connection(), guard))
    result = run_query(db, "SELECT 1; SELECT 2")
    assert result.error == "exec_error" and "one statement" in result.message


def test_missing_database_is_an_error_and_no_file_is_created(tmp_path):
    missing = tmp_path / "nothing" / "none.sqlite"
    result = run_query(missing, "SELECT 1")
    assert not result.ok and result.rows is None
    assert not missing.exists() and not missing.parent.exists()


HOSTILE = [
    "INSERT INTO t VALUES (5)",
    "UPDATE t SET x = 0",
    "DELETE FROM t",
    "DROP TABLE t",
    "CREATE TABLE u(y)",
    "CREATE TEMP TABLE u(y)",
    "REPLACE INTO names VALUES (1, 'eve')",
    "ALTER TABLE t ADD COLUMN y",
    "PRAGMA user_version = 7",
    "PRAGMA journal_mode = WAL",
    "PRAGMA table_info(t)",
    "BEGIN",
    "ANALYZE",
    "REINDEX names_name",
    "VACUUM",
]


@pytest.mark.parametrize("sql", HOSTILE)
def test_writes_and_pragmas_are_refused_and_change_nothing(db, sql):
    before = snapshot(db.parent)
    result = run_query(db, sql)
    assert result.error == "not_read_only", (sql, result)
    assert snapshot(db.parent) == before


@pytest.mark.parametrize("template", ["ATTACH DATABASE '{path}' AS other", "VACUUM INTO '{path}'"])
def test_attach_and_vacuum_into_create_no_file(db, tmp_path, template):
    target = tmp_path / "created.sqlite"
    before = snapshot(tmp_path)
    result = run_query(db, template.format(path=target))
    assert result.error == "not_read_only"
    assert not target.exists() and snapshot(tmp_path) == before


def test_load_extension_is_refused(db):
    result = run_query(db, "SELECT load_extension('/tmp/evil.so')")
    assert result.error == "not_read_only"


@pytest.mark.parametrize(
    "sql",
    [
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
        "SELECT count(*) FROM t a, t b, t c, t d",
    ],
)
def test_endless_queries_are_interrupted_at_the_deadline(db, sql):
    start = time.monotonic()
    result = run_query(db, sql, TIMEOUT)
    elapsed = time.monotonic() - start
    assert result.error == "timeout", result
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + SLACK


def test_too_many_rows_is_too_large(db):
    start = time.monotonic()
    result = run_query(db, "SELECT a.x, b.x FROM t a, t b", 10.0, max_rows=5_000)
    assert result.error == "too_large"
    assert time.monotonic() - start < 5.0


def test_too_large_value_and_total_size(db):
    assert run_query(db, "SELECT randomblob(2000000)").error == "too_large"
    assert run_query(db, "SELECT zeroblob(500000) FROM t", max_total_bytes=10_000_000).error == "too_large"


def test_cached_connection_keeps_guards_per_query(db):
    cache = ConnectionCache(size=1)
    assert run_query(db, "DELETE FROM t", cache=cache).error == "not_read_only"
    assert run_query(db, "SELECT count(*) FROM t", cache=cache).rows == [(1000,)]
    # the deadline is per query: a later query gets its own time limit
    assert run_query(db, "SELECT count(*) FROM t a, t b", 5.0, cache=cache).rows == [(1_000_000,)]
    cache.close()


def test_compile_check_compiles_without_running(db: Path) -> None:
    hanging = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT count(*) FROM c"
    before = snapshot(db.parent)
    start = time.monotonic()
    assert compile_check(hanging, db).error == "ok"
    assert time.monotonic() - start < 0.5  # compiled, never stepped
    assert compile_check("SELECT nope FROM t", db).error == "unknown_table_or_column"
    assert compile_check("SELECT x FROM t WHERE", db).message == "incomplete input"
    assert compile_check("WITH a AS (SELECT 1) DELETE FROM t", db).error == "not_read_only"
    assert snapshot(db.parent) == before


def test_compile_check_without_a_database_checks_the_grammar_only() -> None:
    assert compile_check("SELECT nope FROM nowhere").error == "ok"
    assert compile_check("SELECT x FROM t WHERE )").error == "syntax_error"
    assert compile_check("SELECT ? AS x").error == "exec_error"  # a parameter nobody supplies


# ---------------------------------------------------------------- WAL databases

def wal_database(folder: Path) -> tuple[Path, sqlite3.Connection]:
    """make_db in WAL mode with a row and a table committed only to its -wal (the writer stays open, no checkpoint)."""
    path = make_db(folder / "wal.sqlite")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("INSERT INTO names VALUES (4, 'dan')")
    writer.execute("CREATE TABLE late(y)")
    assert (folder / "wal.sqlite-wal").stat().st_size > 0 and (folder / "wal.sqlite-shm").is_file()
    return path, writer


def test_a_wal_database_is_read_at_its_committed_state_and_its_files_stay_as_they_were(tmp_path):
    folder = tmp_path / "db"
    folder.mkdir()
    path, writer = wal_database(folder)
    try:
        before = snapshot(folder)
        cache = ConnectionCache()
        assert run_query(path, "SELECT name FROM names WHERE id = 4", cache=cache).rows == [("dan",)]
        assert run_query(path, "SELECT count(*) FROM late", cache=cache).rows == [(0,)]
        assert run_query(path, "DELETE FROM names", cache=cache).error == "not_read_only"
        assert compile_check("SELECT y FROM late", path).ok
        cache.close()
        assert snapshot(folder) == before  # .sqlite, -wal and -shm byte for byte and mtime, and no new file

        copy = committed_file(path)
        assert not copy.is_relative_to(folder) and committed_file(path) == copy  # made once, reused
        writer.execute("INSERT INTO names VALUES (5, 'eve')")  # a new version of the -wal: a new copy
        assert committed_file(path) != copy
        assert run_query(path, "SELECT count(*) FROM names", cache=ConnectionCache()).rows == [(5,)]
    finally:
        writer.close()
    assert committed_file(path) == path.resolve()  # closing checkpointed and removed the -wal: read as it is


def test_the_private_copies_are_removed_when_the_process_exits(tmp_path):
    folder = tmp_path / "db"
    folder.mkdir()
    path, writer = wal_database(folder)
    script = ("import sys; from custom_metrics.safe_sqlite import committed_file, run_query; "
              "print(committed_file(sys.argv[1])); print(run_query(sys.argv[1], 'SELECT count(*) FROM names').rows)")
    try:
        out = subprocess.run([sys.executable, "-c", script, str(path)], cwd=Path(__file__).resolve().parent.parent,
                             capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    finally:
        writer.close()
    assert out[1] == "[(4,)]" and Path(out[0]).name == "wal.sqlite"
    assert not Path(out[0]).exists() and not Path(out[0]).parent.parent.exists()
