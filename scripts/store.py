"""The SQLite results store (DB_PATH): every run, generated SQL query and MMLU answer, safe to re-run.

Tables: `runs` (one per kind, model, adapter, config and data fingerprint), `sql_results` (one per run and
Spider example), `mmlu_results` (one per run and MMLU question), and with execution-guided voting
`sql_candidates` (one per run, example, sampling settings and sampled candidate) and `sql_votes` (the voted
answer, one per run, example and sampling settings). Writing the same row again updates it (upsert), so a rerun
or a resumed run never duplicates anything. WAL mode: readable while a run writes.

Example queries (`sqlite3 results/results.sqlite`, or `ResultsStore(path).query(sql)`):

-- 1. Execution accuracy by hardness, per run
SELECT r.id AS run, r.kind, r.adapter, s.hardness, COUNT(*) AS n, ROUND(100.0 * AVG(s.correct), 1) AS ex
FROM sql_results s JOIN runs r ON r.id = s.run_id
WHERE s.correct IS NOT NULL
GROUP BY r.id, s.hardness ORDER BY r.id, s.hardness;

-- 2. Questions the fine-tuned model got right and the base model got wrong
SELECT t.db_id, t.question, b.extracted_sql AS base_sql, t.extracted_sql AS tuned_sql, rt.adapter
FROM sql_results t
JOIN runs rt ON rt.id = t.run_id AND rt.adapter != ''
JOIN sql_results b ON b.example_key = t.example_key
JOIN runs rb ON rb.id = b.run_id AND rb.adapter = '' AND rb.model = rt.model
WHERE t.correct = 1 AND b.correct = 0
ORDER BY rt.adapter, t.db_id, t.question;

-- 3. Most common error classes, per run
SELECT r.id AS run, r.kind, s.error, COUNT(*) AS n
FROM sql_results s JOIN runs r ON r.id = s.run_id
WHERE s.error IS NOT NULL AND s.error != 'ok'
GROUP BY r.id, s.error ORDER BY r.id, n DESC, s.error;

-- 4. Greedy against voted EX, per run and sampling settings
SELECT r.id AS run, r.kind, v.sampling, COUNT(*) AS n, ROUND(100.0 * AVG(s.correct), 1) AS greedy_ex,
       ROUND(100.0 * AVG(v.correct), 1) AS voted_ex, SUM(v.changed) AS changed
FROM sql_votes v
JOIN sql_results s ON s.run_id = v.run_id AND s.example_key = v.example_key
JOIN runs r ON r.id = v.run_id
WHERE v.correct IS NOT NULL
GROUP BY r.id, v.sampling ORDER BY r.id;

-- 5. The candidates of the questions the vote got right and the greedy answer wrong
SELECT v.example_key, s.extracted_sql AS greedy_sql, v.voted_sql, v.votes, v.voters,
       c.candidate_index, c.extracted_sql, c.fingerprint, c.error
FROM sql_votes v
JOIN sql_results s ON s.run_id = v.run_id AND s.example_key = v.example_key
JOIN sql_candidates c ON c.run_id = v.run_id AND c.example_key = v.example_key AND c.sampling = v.sampling
WHERE v.correct = 1 AND s.correct = 0
ORDER BY v.example_key, c.candidate_index;

-- 6. Candidates by outcome ('ok' or the error class), per run
SELECT r.kind, c.error, COUNT(*) AS n
FROM sql_candidates c JOIN runs r ON r.id = c.run_id
GROUP BY r.id, c.error ORDER BY r.id, n DESC, c.error;
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from scripts.errors import UserError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    adapter TEXT NOT NULL DEFAULT '',  -- '' for the base model (NULLs would defeat the UNIQUE key)
    config TEXT NOT NULL,              -- canonical JSON
    data_fingerprint TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (kind, model, adapter, config, data_fingerprint)
);
CREATE TABLE IF NOT EXISTS sql_results (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    example_key TEXT NOT NULL,
    db_id TEXT,
    question TEXT,
    gold_sql TEXT,
    raw_output TEXT,
    extracted_sql TEXT,
    correct INTEGER,                   -- 1, 0, or NULL when not scored (no database, not yet scored)
    error TEXT,
    hardness TEXT,
    latency_s REAL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (run_id, example_key)
);
CREATE TABLE IF NOT EXISTS mmlu_results (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    subject TEXT NOT NULL,
    question_index INTEGER NOT NULL,
    prediction TEXT,
    answer TEXT,
    correct INTEGER,
    loglikelihoods TEXT,               -- JSON list of 4 floats (A..D)
    updated_at TEXT NOT NULL,
    PRIMARY KEY (run_id, subject, question_index)
);
CREATE TABLE IF NOT EXISTS sql_candidates (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    example_key TEXT NOT NULL,
    sampling TEXT NOT NULL,            -- canonical JSON: n, temperature, top_p, seed
    candidate_index INTEGER NOT NULL,  -- 0 .. n-1
    raw_output TEXT,
    extracted_sql TEXT,
    fingerprint TEXT,                  -- result fingerprint (scripts/voting.py); NULL when it failed or is not run yet
    error TEXT,                        -- 'ok' or the error class; NULL until executed
    latency_s REAL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (run_id, example_key, sampling, candidate_index)
);
CREATE TABLE IF NOT EXISTS sql_votes (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    example_key TEXT NOT NULL,
    sampling TEXT NOT NULL,
    greedy_fingerprint TEXT,           -- NULL when the greedy answer failed
    voted_sql TEXT,
    fingerprint TEXT,                  -- the winning result; NULL when nothing ran (the greedy answer stands)
    votes INTEGER,                     -- answers in the winning group (the greedy answer counts)
    voters INTEGER,                    -- answers that ran
    changed INTEGER,                   -- 1 when the voted result is not the greedy answer's
    correct INTEGER,                   -- the voted answer's EX: 1, 0, or NULL when not scored
    error TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (run_id, example_key, sampling)
);
"""

SQL_COLUMNS = ("example_key", "db_id", "question", "gold_sql", "raw_output", "extracted_sql", "correct", "error",
               "hardness", "latency_s")
CANDIDATE_COLUMNS = ("example_key", "candidate_index", "raw_output", "extracted_sql", "fingerprint", "error",
                     "latency_s")
VOTE_COLUMNS = ("example_key", "greedy_fingerprint", "voted_sql", "fingerprint", "votes", "voters", "changed",
                "correct", "error")


def data_fingerprint(obj: Any) -> str:
    """A stable hash of JSON-able data (dict keys sorted; paths and other objects by their str)."""
    text = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def example_queries() -> dict[str, str]:
    """The example queries of this module's docstring, by title."""
    blocks = re.findall(r"^-- \d+\. (.+?)\n(.+?;)$", __doc__, flags=re.M | re.S)
    return {title.strip(): sql for title, sql in blocks}


def _now() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _canonical(config: Any) -> str:
    """Config as canonical JSON, so equal configs give equal run keys."""
    return json.dumps(config if config is not None else {}, sort_keys=True, default=str)


def _bool_or_none(value) -> int | None:
    """SQLite's 1/0 for a truth value, NULL for unknown."""
    return None if value is None else int(bool(value))


class ResultsStore:
    """The results database; use as a context manager or call close()."""

    def __init__(self, path: Path | str) -> None:
        if path is None:
            raise UserError("DB_PATH is not set; set it in .env or leave it empty for <RESULTS_DIR>/results.sqlite")
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30.0)
        except (OSError, sqlite3.Error) as e:
            raise UserError(f"DB_PATH: cannot open the results database {self.path} ({e}); choose a writable path") from e
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA foreign_keys = ON")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("results database %s is in %s mode, not WAL: readers may wait for writers", self.path, mode)
            self._conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode, and much faster
            with self._conn:
                self._conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:  # e.g. a file that is not SQLite (settings reject it before a run)
            self._conn.close()
            raise UserError(f"DB_PATH: {self.path} cannot be used as the results database ({e}); give a new path") from None

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (everything written is already committed)."""
        self._conn.close()

    def start_run(self, kind: str, model: str, adapter: str | None, config: Any, data_fingerprint: str) -> int:
        """The id of the run with this key, created when new (the same key always gives the same id)."""
        key = (kind, str(model), str(adapter) if adapter else "", _canonical(config), data_fingerprint)
        with self._conn:
            self._conn.execute(
                "INSERT INTO runs (kind, model, adapter, config, data_fingerprint, created_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, model, adapter, config, data_fingerprint) DO NOTHING",
                key + (_now(),),
            )
            row = self._conn.execute(
                "SELECT id FROM runs WHERE kind = ? AND model = ? AND adapter = ? AND config = ? AND data_fingerprint = ?",
                key,
            ).fetchone()
        return int(row["id"])

    def add_sql(self, run_id: int, rows: Iterable[dict]) -> None:
        """Insert or update generated-SQL rows (keyed by `example_key`; see SQL_COLUMNS for the fields)."""
        values = []
        for row in rows:
            if not row.get("example_key"):
                raise ValueError(f"a SQL result row needs an example_key: {row!r}")
            record = {c: row.get(c) for c in SQL_COLUMNS}
            record["correct"] = _bool_or_none(record["correct"])
            values.append((run_id, *record.values(), _now()))
        updates = ", ".join(f"{c} = excluded.{c}" for c in SQL_COLUMNS[1:] + ("updated_at",))
        with self._conn:
            self._conn.executemany(
                f"INSERT INTO sql_results (run_id, {', '.join(SQL_COLUMNS)}, updated_at) "
                f"VALUES ({', '.join('?' * (len(SQL_COLUMNS) + 2))}) "
                f"ON CONFLICT (run_id, example_key) DO UPDATE SET {updates}",
                values,
            )

    def add_candidates(self, run_id: int, sampling: Any, rows: Iterable[dict]) -> None:
        """Insert or update sampled candidates (keyed by `example_key` and `candidate_index` under these settings)."""
        self._upsert("sql_candidates", CANDIDATE_COLUMNS, ("example_key", "candidate_index"), run_id, sampling, rows)

    def candidate_rows(self, run_id: int, sampling: Any) -> list[dict]:
        """A run's candidates under these sampling settings, by example (in insertion order) and index."""
        return self.query(
            f"SELECT {', '.join(CANDIDATE_COLUMNS)} FROM sql_candidates WHERE run_id = ? AND sampling = ? "
            "ORDER BY rowid", (run_id, _canonical(sampling)))

    def add_votes(self, run_id: int, sampling: Any, rows: Iterable[dict]) -> None:
        """Insert or update voted answers (keyed by `example_key` under these sampling settings)."""
        rows = [{**row, "changed": _bool_or_none(row.get("changed")), "correct": _bool_or_none(row.get("correct"))}
                for row in rows]
        self._upsert("sql_votes", VOTE_COLUMNS, ("example_key",), run_id, sampling, rows)

    def vote_rows(self, run_id: int, sampling: Any) -> list[dict]:
        """A run's voted answers under these sampling settings (`changed` and `correct` as bool or None)."""
        rows = self.query(f"SELECT {', '.join(VOTE_COLUMNS)} FROM sql_votes WHERE run_id = ? AND sampling = ? "
                          "ORDER BY rowid", (run_id, _canonical(sampling)))
        for row in rows:
            for name in ("changed", "correct"):
                row[name] = None if row[name] is None else bool(row[name])
        return rows

    def _upsert(self, table: str, columns: tuple[str, ...], key: tuple[str, ...], run_id: int, sampling: Any,
                rows: Iterable[dict]) -> None:
        """Insert or update rows of a voting table (one row per run, sampling settings and `key`)."""
        values = []
        for row in rows:
            if any(row.get(k) is None for k in key):
                raise ValueError(f"a {table} row needs {', '.join(key)}: {row!r}")
            values.append((run_id, _canonical(sampling), *(row.get(c) for c in columns), _now()))
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns + ("updated_at",) if c not in key)
        with self._conn:
            self._conn.executemany(
                f"INSERT INTO {table} (run_id, sampling, {', '.join(columns)}, updated_at) "
                f"VALUES ({', '.join('?' * (len(columns) + 3))}) "
                f"ON CONFLICT (run_id, sampling, {', '.join(key)}) DO UPDATE SET {updates}",
                values,
            )

    def add_mmlu(self, run_id: int, rows: Iterable[dict]) -> None:
        """Insert or update MMLU answers (keyed by `subject` and `index`)."""
        values = [
            (run_id, row["subject"], int(row["index"]), row.get("prediction"), row.get("answer"),
             _bool_or_none(row.get("correct")),
             json.dumps(row["loglikelihoods"]) if row.get("loglikelihoods") is not None else None, _now())
            for row in rows
        ]
        with self._conn:
            self._conn.executemany(
                "INSERT INTO mmlu_results (run_id, subject, question_index, prediction, answer, correct, loglikelihoods, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, subject, question_index) DO UPDATE SET "
                "prediction = excluded.prediction, answer = excluded.answer, correct = excluded.correct, "
                "loglikelihoods = excluded.loglikelihoods, updated_at = excluded.updated_at",
                values,
            )

    def sql_rows(self, run_id: int) -> list[dict]:
        """A run's SQL rows in insertion order (`correct` as bool or None)."""
        rows = self.query(f"SELECT {', '.join(SQL_COLUMNS)} FROM sql_results WHERE run_id = ? ORDER BY rowid", (run_id,))
        for row in rows:
            row["correct"] = None if row["correct"] is None else bool(row["correct"])
        return rows

    def mmlu_rows(self, run_id: int) -> list[dict]:
        """A run's MMLU answers by subject and index (`index`, `correct` as bool, `loglikelihoods` as a list)."""
        rows = self.query(
            "SELECT subject, question_index AS \"index\", prediction, answer, correct, loglikelihoods FROM mmlu_results "
            "WHERE run_id = ? ORDER BY subject, question_index",
            (run_id,),
        )
        for row in rows:
            row["correct"] = None if row["correct"] is None else bool(row["correct"])
            row["loglikelihoods"] = None if row["loglikelihoods"] is None else json.loads(row["loglikelihoods"])
        return rows

    def runs(self) -> list[dict]:
        """Every run with its number of SQL and MMLU rows (`config` parsed, `adapter` None for the base model)."""
        rows = self.query(
            "SELECT r.*, (SELECT COUNT(*) FROM sql_results s WHERE s.run_id = r.id) AS sql_count, "
            "(SELECT COUNT(*) FROM mmlu_results m WHERE m.run_id = r.id) AS mmlu_count FROM runs r ORDER BY r.id"
        )
        for row in rows:
            row["config"] = json.loads(row["config"])
            row["adapter"] = row["adapter"] or None
        return rows

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict]:
        """Any read query, as a list of dicts."""
        return [dict(row) for row in self._conn.execute(sql, tuple(params)).fetchall()]


class Spool:
    """Answers the other processes of a launch made but have not yet handed over: one JSONL file per process.

    The main process alone writes the store, so if a launch is interrupted mid-stage the others' answers would be
    lost. Each of them appends its rows here batch by batch (next to DB_PATH, in `<DB_PATH>.spool/`); the main
    process moves the run's files into the store when the stage starts again, and clears them once it has gathered
    the answers.
    """

    def __init__(self, db_path: Path | str, kind: str, run_id: int) -> None:
        self.folder = Path(f"{db_path}.spool")
        self.prefix = f"{kind}-run{run_id}-rank"

    def append(self, rank: int, rows: list[dict]) -> None:
        """Add one batch of a process's rows."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{self.prefix}{rank}.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def files(self) -> list[Path]:
        """This run's spool files, one per process that wrote any."""
        return sorted(self.folder.glob(f"{self.prefix}*.jsonl")) if self.folder.is_dir() else []

    def read(self) -> list[dict]:
        """Every row spooled for this run (a last line cut off by the interruption is left out: it is redone)."""
        rows, cut = [], 0
        for file in self.files():
            for line in file.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    cut += 1
        if cut:
            log.warning("spool %s: %d incomplete line(s) left out; those answers are made again", self.folder, cut)
        return rows

    def clear(self) -> None:
        """Remove this run's files (their rows are in the store)."""
        for file in self.files():
            file.unlink()

    def drain(self, add: Callable[[list[dict]], None], resume: bool = True) -> int:
        """Hand the spooled rows to `add` (unless not resuming: then they are dropped), clear; how many there were."""
        rows = self.read() if resume else []
        if rows:
            add(rows)
        self.clear()
        return len(rows)
