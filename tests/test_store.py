"""Tests for scripts/store.py: schema, idempotent upserts, WAL mode, reading during a write, example queries."""
import sqlite3

import pytest

from scripts.store import ResultsStore, data_fingerprint, example_queries

CONFIG = {"max_new_tokens": 160, "schema_sample_rows": 0}


def _sql_row(key: str, correct, error="ok", hardness="easy", db_id="singer") -> dict:
    """A generated-SQL row as scripts/answers.py writes it."""
    return {"example_key": f"{db_id}::{key}", "db_id": db_id, "question": key, "gold_sql": "SELECT 1",
            "raw_output": "```sql\nSELECT 1\n```", "extracted_sql": "SELECT 1", "correct": correct, "error": error,
            "hardness": hardness, "latency_s": 0.25}


def _counts(path) -> tuple[int, int, int]:
    """Rows in runs, sql_results and mmlu_results, read through a separate plain connection."""
    with sqlite3.connect(path) as conn:
        return tuple(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("runs", "sql_results", "mmlu_results"))


def test_schema_has_the_five_tables_and_their_keys(tmp_path):
    path = tmp_path / "sub" / "results.sqlite"
    with ResultsStore(path):
        pass
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    assert tables == {"runs", "sql_results", "mmlu_results", "sql_candidates", "sql_votes"}
    assert {"kind", "model", "adapter", "config", "data_fingerprint", "created_at"} <= set(columns["runs"])
    assert {"example_key", "db_id", "question", "gold_sql", "raw_output", "extracted_sql", "correct", "error",
            "hardness", "latency_s"} <= set(columns["sql_results"])
    assert {"subject", "question_index", "prediction", "answer", "correct", "loglikelihoods"} <= set(columns["mmlu_results"])
    assert {"example_key", "sampling", "candidate_index", "raw_output", "extracted_sql", "fingerprint", "error",
            "latency_s"} <= set(columns["sql_candidates"])
    assert {"example_key", "sampling", "greedy_fingerprint", "voted_sql", "fingerprint", "votes", "voters", "changed",
            "correct", "error"} <= set(columns["sql_votes"])


def test_candidates_and_votes_upsert_per_sampling_settings(tmp_path):
    """A candidate written again (first generated, then executed) is updated in place; other settings keep theirs."""
    path = tmp_path / "r.sqlite"
    warm, hot = {"n": 2, "temperature": 0.7, "top_p": 0.95, "seed": 0}, {"n": 2, "temperature": 1.0, "top_p": 0.95, "seed": 0}
    with ResultsStore(path) as store:
        run = store.start_run("baseline_ex", "m", None, CONFIG, "fp")
        generated = [{"example_key": "singer::q1", "candidate_index": j, "raw_output": f"SELECT {j}", "latency_s": 0.5}
                     for j in range(2)]
        store.add_candidates(run, warm, generated)
        store.add_candidates(run, hot, generated[:1])
        store.add_candidates(run, {"top_p": 0.95, "seed": 0, "n": 2, "temperature": 0.7},  # key order does not matter
                             [{**row, "extracted_sql": row["raw_output"], "fingerprint": "f" * 16, "error": "ok"}
                              for row in generated])
        store.add_votes(run, warm, [{"example_key": "singer::q1", "voted_sql": "SELECT 0", "votes": 1, "voters": 3,
                                     "changed": True, "correct": False, "error": "wrong_result"}])
        candidates, others, votes = store.candidate_rows(run, warm), store.candidate_rows(run, hot), store.vote_rows(run, warm)
        with pytest.raises(ValueError, match="candidate_index"):
            store.add_candidates(run, warm, [{"example_key": "singer::q2"}])
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sql_candidates").fetchone()[0] == 3
    assert [(c["candidate_index"], c["raw_output"], c["fingerprint"], c["error"], c["latency_s"]) for c in candidates] == [
        (0, "SELECT 0", "f" * 16, "ok", 0.5), (1, "SELECT 1", "f" * 16, "ok", 0.5)]
    assert [(c["candidate_index"], c["fingerprint"]) for c in others] == [(0, None)]
    assert votes == [{"example_key": "singer::q1", "greedy_fingerprint": None, "voted_sql": "SELECT 0",
                      "fingerprint": None, "votes": 1, "voters": 3, "changed": True, "correct": False,
                      "error": "wrong_result"}]


def test_start_run_is_idempotent_on_its_key(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        first = store.start_run("baseline", "m", None, {"b": 1, "a": 2}, "fp1")
        assert store.start_run("baseline", "m", None, {"a": 2, "b": 1}, "fp1") == first  # key order does not matter
        assert store.start_run("baseline", "m", "", {"a": 2, "b": 1}, "fp1") == first  # "" and None: the base model
        others = {store.start_run("finetuned", "m", None, {"a": 2, "b": 1}, "fp1"),
                  store.start_run("baseline", "m", "results/run1/adapter", {"a": 2, "b": 1}, "fp1"),
                  store.start_run("baseline", "m", None, {"a": 3, "b": 1}, "fp1"),
                  store.start_run("baseline", "m", None, {"a": 2, "b": 1}, "fp2")}
        assert first not in others and len(others) == 4
        runs = store.runs()
    assert [r["adapter"] for r in runs] == [None, None, "results/run1/adapter", None, None]
    assert runs[0]["config"] == {"a": 2, "b": 1} and runs[0]["created_at"]


def test_rerun_updates_rows_without_adding_any(tmp_path):
    path = tmp_path / "r.sqlite"
    mmlu = [{"subject": "anatomy", "index": i, "prediction": "A", "answer": "AB"[i % 2], "correct": i % 2 == 0,
             "loglikelihoods": [-1.0, -2.0, -3.0, -4.5]} for i in range(4)]
    with ResultsStore(path) as store:
        run = store.start_run("baseline", "m", None, CONFIG, "fp")
        store.add_sql(run, [_sql_row("q1", None, error=None, hardness=None), _sql_row("q2", None, error=None)])
        store.add_mmlu(run, mmlu)
    assert _counts(path) == (1, 2, 4)
    with ResultsStore(path) as store:  # the same run again, now scored
        run_again = store.start_run("baseline", "m", None, CONFIG, "fp")
        store.add_sql(run_again, [_sql_row("q1", True), _sql_row("q2", False, error="wrong_result")])
        store.add_mmlu(run_again, mmlu)
        rows = store.sql_rows(run_again)
        answers = store.mmlu_rows(run_again)
    assert run_again == run
    assert _counts(path) == (1, 2, 4)
    assert [(r["example_key"], r["correct"], r["error"], r["hardness"]) for r in rows] == [
        ("singer::q1", True, "ok", "easy"), ("singer::q2", False, "wrong_result", "easy")]
    assert answers[1] == {"subject": "anatomy", "index": 1, "prediction": "A", "answer": "B", "correct": False,
                          "loglikelihoods": [-1.0, -2.0, -3.0, -4.5]}


def test_add_sql_needs_an_example_key(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        run = store.start_run("baseline", "m", None, CONFIG, "fp")
        with pytest.raises(ValueError, match="example_key"):
            store.add_sql(run, [{"question": "q"}])


def test_database_is_in_wal_mode(tmp_path):
    path = tmp_path / "r.sqlite"
    ResultsStore(path).close()
    with sqlite3.connect(path) as conn:  # WAL is a property of the file: a fresh connection sees it
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_readers_are_not_blocked_by_an_exclusive_writer(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultsStore(path) as store:
        run = store.start_run("baseline", "m", None, CONFIG, "fp")
        store.add_sql(run, [_sql_row("q1", True)])
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # in rollback-journal mode this lock would block every reader
    writer.execute("INSERT INTO sql_results (run_id, example_key, updated_at) VALUES (?, 'singer::q2', 'now')", (run,))
    try:
        reader = ResultsStore(path)
        reader._conn.execute("PRAGMA busy_timeout = 0")  # fail at once instead of waiting for the writer
        assert [r["example_key"] for r in reader.sql_rows(run)] == ["singer::q1"]  # the committed state
        writer.execute("COMMIT")
        assert [r["example_key"] for r in reader.sql_rows(run)] == ["singer::q1", "singer::q2"]
        reader.close()
    finally:
        writer.close()


def test_data_fingerprint_is_stable_and_content_sensitive():
    a = data_fingerprint([{"db_id": "x", "question": "q"}, {"b": 2, "a": 1}])
    assert a == data_fingerprint([{"question": "q", "db_id": "x"}, {"a": 1, "b": 2}])
    assert a != data_fingerprint([{"db_id": "x", "question": "q?"}, {"b": 2, "a": 1}])
    assert len(a) == 16 and int(a, 16) >= 0


def test_the_three_example_queries_of_the_docstring_answer_correctly(tmp_path):
    queries = example_queries()
    assert len(queries) == 6
    by_hardness, fixed, errors = list(queries.values())[:3]
    with ResultsStore(tmp_path / "r.sqlite") as store:
        base = store.start_run("baseline_ex", "m", None, CONFIG, "fp")
        tuned = store.start_run("ex_run1", "m", "results/run1/adapter", CONFIG, "fp")
        store.add_sql(base, [_sql_row("q1", True), _sql_row("q2", False, "syntax_error"),
                             _sql_row("q3", False, "wrong_result", "hard"), _sql_row("q4", False, "syntax_error", "hard"),
                             _sql_row("q5", None, "db_missing", "hard", db_id="wta_1")])
        store.add_sql(tuned, [_sql_row("q1", False, "wrong_result"), _sql_row("q2", True),
                              _sql_row("q3", True, hardness="hard"), _sql_row("q4", False, "syntax_error", "hard"),
                              _sql_row("q5", None, "db_missing", "hard", db_id="wta_1")])
        ex = store.query(by_hardness)
        gained = store.query(fixed)
        error_counts = store.query(errors)
    assert [(r["run"], r["hardness"], r["n"], r["ex"]) for r in ex] == [
        (base, "easy", 2, 50.0), (base, "hard", 2, 0.0), (tuned, "easy", 2, 50.0), (tuned, "hard", 2, 50.0)]
    assert [(r["question"], r["adapter"]) for r in gained] == [("q2", "results/run1/adapter"), ("q3", "results/run1/adapter")]
    assert [(r["run"], r["error"], r["n"]) for r in error_counts] == [
        (base, "syntax_error", 2), (base, "db_missing", 1), (base, "wrong_result", 1),
        (tuned, "db_missing", 1), (tuned, "syntax_error", 1), (tuned, "wrong_result", 1)]


def test_the_three_voting_queries_of_the_docstring_answer_correctly(tmp_path):
    compared, fixed_by_vote, outcomes = list(example_queries().values())[3:]
    sampling = {"n": 2, "temperature": 0.7, "top_p": 0.95, "seed": 0}
    with ResultsStore(tmp_path / "r.sqlite") as store:
        run = store.start_run("baseline_ex", "m", None, CONFIG, "fp")
        store.add_sql(run, [_sql_row("q1", False, "wrong_result"), _sql_row("q2", True), _sql_row("q3", False)])
        store.add_candidates(run, sampling, [
            {"example_key": f"singer::{q}", "candidate_index": j, "extracted_sql": f"SELECT {j}",
             "fingerprint": "f" if error == "ok" else None, "error": error}
            for q, errors in (("q1", ("ok", "ok")), ("q2", ("ok", "syntax_error")), ("q3", ("timeout", "ok")))
            for j, error in enumerate(errors)])
        store.add_votes(run, sampling, [
            {"example_key": "singer::q1", "voted_sql": "SELECT 0", "votes": 2, "voters": 3, "changed": True,
             "correct": True},
            {"example_key": "singer::q2", "voted_sql": "SELECT 1", "votes": 2, "voters": 2, "changed": False,
             "correct": True},
            {"example_key": "singer::q3", "voted_sql": "SELECT 1", "votes": 1, "voters": 2, "changed": True,
             "correct": False}])
        side_by_side, fixed, by_outcome = store.query(compared), store.query(fixed_by_vote), store.query(outcomes)
    assert [(r["n"], r["greedy_ex"], r["voted_ex"], r["changed"]) for r in side_by_side] == [(3, 33.3, 66.7, 2)]
    assert [(r["example_key"], r["candidate_index"], r["error"]) for r in fixed] == [
        ("singer::q1", 0, "ok"), ("singer::q1", 1, "ok")]
    assert [(r["error"], r["n"]) for r in by_outcome] == [("ok", 4), ("syntax_error", 1), ("timeout", 1)]
