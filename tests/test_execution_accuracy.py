"""Execution accuracy: official comparison rules, error classes, hostile predictions, CLI, evaluate.load, real dev."""
import itertools
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlparse

from custom_metrics.execution_accuracy import (UserError, check_golds, database_files, database_path,
                                               execution_accuracy, read_gold, remove_distinct, result_eq)

REPO_ROOT = Path(__file__).resolve().parent.parent
DB_ID = "shop"


def make_shop(db_dir: Path) -> Path:
    """<db_dir>/shop/shop.sqlite with items(id, name, price, qty) and t(x) = 0..999."""
    folder = db_dir / DB_ID
    folder.mkdir(parents=True)
    conn = sqlite3.connect(folder / f"{DB_ID}.sqlite")
    conn.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, price REAL, qty INTEGER)")
    conn.executemany(
        "INSERT INTO items VALUES (?, ?, ?, ?)",
        [(1, "a", 1.0, 1), (2, "b", 2.5, 2), (3, "c", 2.5, 3), (4, "a", 4.0, 1)],
    )
    conn.execute("CREATE TABLE t(x INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    conn.commit()
    conn.close()
    return folder


@pytest.fixture
def db_dir(tmp_path: Path) -> Path:
    path = tmp_path / "database"
    make_shop(path)
    return path


def score(db_dir, pred, gold, **kwargs) -> dict:
    """The per-example outcome of one (pred, gold) pair on the shop database."""
    return execution_accuracy([pred], [gold], [DB_ID], db_dir, **kwargs)["per_example"][0]


# ---------------------------------------------------------------- comparison rules

@pytest.mark.parametrize(
    ("pred", "gold", "correct"),
    [
        # order matters only when the gold has ORDER BY
        ("SELECT name FROM items ORDER BY id DESC", "SELECT name FROM items", True),
        ("SELECT name FROM items ORDER BY id DESC", "SELECT name FROM items ORDER BY id", False),
        # column permutation, with and without order
        ("SELECT name, id FROM items", "SELECT id, name FROM items", True),
        ("SELECT name, id FROM items ORDER BY id", "SELECT id, name FROM items ORDER BY id", True),
        # 1 == 1.0
        ("SELECT price FROM items WHERE id = 1", "SELECT qty FROM items WHERE id = 1", True),
        # both empty (even with different columns)
        ("SELECT name, qty FROM items WHERE price < 0", "SELECT id FROM items WHERE id > 100", True),
        # duplicates matter: same set of rows, different bag
        ("SELECT name FROM items WHERE id <= 3 UNION ALL SELECT 'b'", "SELECT name FROM items", False),
        # different row count / column count
        ("SELECT name FROM items WHERE id < 4", "SELECT name FROM items", False),
        ("SELECT name, id FROM items", "SELECT name FROM items", False),
        # '> =' repaired before execution
        ("SELECT id FROM items WHERE price > = 2.5", "SELECT id FROM items WHERE price >= 2.5", True),
        ("SELECT id FROM items WHERE price ! = 2.5", "SELECT id FROM items WHERE price != 2.5", True),
        # YEAR(CURDATE()) -> 2020 in both queries
        ("SELECT 2020 - 1", "SELECT YEAR(CURDATE()) - 1", True),
        # ' value ' placeholder -> 1 (after stripping, as the official reader does)
        ("SELECT name FROM items WHERE qty = value AND id < 9", "SELECT name FROM items WHERE qty = 1", True),
    ],
)
def test_comparison_rules(db_dir, pred, gold, correct):
    outcome = score(db_dir, pred, gold)
    assert outcome["correct"] is correct, outcome
    assert outcome["error"] == ("ok" if correct else "wrong_result")


def test_distinct_removed_unless_keep_distinct(db_dir):
    pred, gold = "SELECT DISTINCT name FROM items", "SELECT name FROM items"
    assert score(db_dir, pred, gold)["correct"] is True
    assert score(db_dir, pred, gold, keep_distinct=True)["correct"] is False
    assert score(db_dir, "SELECT count(DISTINCT name) FROM items", "SELECT count(name) FROM items")["correct"] is True


def test_remove_distinct_matches_sqlparse_exactly():
    queries = [
        "SELECT DISTINCT a FROM t", "select distinct(a) from t", "SELECT a FROM t; DROP TABLE t",
        "SELECT 'distinct' FROM t", "SELECT a FROM t", "SELECT a FROM t GO SELECT 2", "SELECT a FROM t\nGO",
        "SELECT a AS distinctive FROM t", "SELECT count(DISTINCT a) FROM t;",
    ]
    for query in queries:
        official = "".join(t.value for t in sqlparse.parse(query)[0].flatten() if t.value.lower() != "distinct")
        assert remove_distinct(query) == official, query


def brute_force_eq(gold, pred, order_matters):
    """Reference: try every column permutation."""
    if not gold and not pred:
        return True
    if len(gold) != len(pred) or len(gold[0]) != len(pred[0]):
        return False
    for perm in itertools.permutations(range(len(gold[0]))):
        permuted = [tuple(row[i] for i in perm) for row in pred]
        if (gold == permuted) if order_matters else (sorted(map(repr, gold)) == sorted(map(repr, permuted))):
            return True
    return False


def test_result_eq_agrees_with_brute_force_on_random_tables():
    rng = random.Random(0)
    checked = agree_true = 0
    for _ in range(3000):
        cols, rows = rng.randint(1, 4), rng.randint(1, 4)
        gold = [tuple(rng.randint(0, 2) for _ in range(cols)) for _ in range(rows)]
        perm = rng.sample(range(cols), cols)
        pred = [tuple(row[i] for i in perm) for row in gold]
        if rng.random() < 0.5:
            rng.shuffle(pred)
        if rng.random() < 0.5:  # perturb one value
            r, c = rng.randrange(rows), rng.randrange(cols)
            pred[r] = pred[r][:c] + (rng.randint(0, 2),) + pred[r][c + 1 :]
        for order in (True, False):
            expected = brute_force_eq(gold, pred, order)
            assert result_eq(gold, pred, order) == expected, (gold, pred, order)
            checked += 1
            agree_true += expected
    assert 0 < agree_true < checked  # both outcomes were exercised


def test_result_eq_many_columns_is_fast():
    gold = [tuple(range(i, i + 12)) for i in range(200)]
    pred = [tuple(reversed(row)) for row in gold]
    start = time.monotonic()
    assert result_eq(gold, pred, order_matters=False)
    assert not result_eq(gold, pred[:-1] + [tuple(range(12))], order_matters=False)
    assert time.monotonic() - start < 2.0


# ---------------------------------------------------------------- error classes

@pytest.mark.parametrize(
    ("pred", "error"),
    [
        ("SELEC name FROM items", "syntax_error"),
        ("SELECT name FROM nope", "unknown_table_or_column"),
        ("SELECT nope FROM items", "unknown_table_or_column"),
        ("   ", "empty"),
        ("DELETE FROM items", "not_read_only"),
        ("SELECT randomblob(2000000)", "too_large"),
        ("SELECT abs(-9223372036854775808)", "exec_error"),
        ("SELECT count(*) FROM t a, t b, t c", "timeout"),
    ],
)
def test_error_classes_of_predictions(db_dir, pred, error):
    outcome = score(db_dir, pred, "SELECT name FROM items", timeout=0.5)
    assert outcome["correct"] is False and outcome["error"] == error, outcome


def test_gold_error_and_db_missing_are_excluded(db_dir):
    summary = execution_accuracy(
        ["SELECT name FROM items", "SELECT 1", "SELECT 1", "SELECT name FROM items"],
        ["SELECT nope FROM items", "SELECT 1", "SELECT 1", "SELECT id FROM items"],
        [DB_ID, "ghost", "ghost", DB_ID],
        db_dir,
    )
    errors = [e["error"] for e in summary["per_example"]]
    assert errors == ["gold_error", "db_missing", "db_missing", "wrong_result"]
    assert [e["correct"] for e in summary["per_example"]] == [None, None, None, False]
    assert summary["count"] == 1 and summary["ex"] == 0.0 and summary["total"] == 4
    assert summary["db_missing"] == {"ghost": 2}
    assert summary["errors"] == {"gold_error": 1, "db_missing": 2, "wrong_result": 1}
    assert not (db_dir / "ghost").exists()


def test_a_database_may_also_be_one_file_named_after_its_db_id(tmp_path):
    """<db_dir>/<db_id>.sqlite is found as <db_dir>/<db_id>/<db_id>.sqlite is (the folder form wins when both exist)."""
    flat_dir = tmp_path / "flat"
    flat_dir.mkdir()
    (make_shop(tmp_path / "src") / f"{DB_ID}.sqlite").rename(flat_dir / f"{DB_ID}.sqlite")
    summary = execution_accuracy(["SELECT name FROM items", "SELECT 1"], ["SELECT name FROM items", "SELECT 1"],
                                 [DB_ID, "ghost"], flat_dir)
    assert [e["error"] for e in summary["per_example"]] == ["ok", "db_missing"]
    assert "ghost.sqlite" in summary["per_example"][1]["message"]  # both places it looked are named

    folder = make_shop(flat_dir)  # now also shop/shop.sqlite, with other contents: that one is used
    conn = sqlite3.connect(folder / f"{DB_ID}.sqlite")
    conn.execute("DELETE FROM items WHERE id > 1")
    conn.commit()
    conn.close()
    assert score(flat_dir, "SELECT count(*) FROM items", "SELECT 1")["correct"] is True


def test_a_db_id_outside_the_database_folder_is_never_opened(db_dir, tmp_path):
    inner = db_dir / "inner"
    inner.mkdir()
    escape = f"../{DB_ID}"  # inner/../shop.sqlite would be a real database file
    shutil.copy(db_dir / DB_ID / f"{DB_ID}.sqlite", db_dir / f"{DB_ID}.sqlite")
    assert database_path(inner, escape) is None and database_path(inner, "..") is None
    with pytest.raises(UserError, match=r"not plain names"):
        execution_accuracy(["SELECT 1"], ["SELECT 1"], [escape], inner)
    gold = tmp_path / "gold.sql"
    gold.write_text(f"SELECT 1\t{DB_ID}\nSELECT 1\t{escape}\n")
    with pytest.raises(UserError, match=r"gold\.sql line 2: db_id .* is not a plain name"):
        read_gold(gold)


def test_check_golds_runs_each_gold_as_scoring_does_and_changes_nothing(db_dir):
    from custom_metrics.execution_accuracy import check_golds

    before = {p.name: p.read_bytes() for p in (db_dir / DB_ID).iterdir()}
    golds = ["SELECT DISTINCT name FROM items WHERE price > = 2",  # repaired operator and DISTINCT, as when scoring
             "SELECT nope FROM items", "DELETE FROM items", "SELECT 1"]
    outcomes = check_golds(golds, [DB_ID, DB_ID, DB_ID, "ghost"], db_dir, timeout=5.0)
    assert [o["error"] for o in outcomes] == ["ok", "gold_error", "gold_error", "db_missing"]
    assert "no such column: nope" in outcomes[1]["message"] and "not_read_only" in outcomes[2]["message"]
    assert {p.name: p.read_bytes() for p in (db_dir / DB_ID).iterdir()} == before


def test_summary_by_hardness(db_dir):
    golds = ["SELECT name FROM items", "SELECT name FROM items WHERE qty = 1 OR price > 2",
             "SELECT CASE WHEN id > 1 THEN 'x' ELSE 'y' END FROM items"]
    summary = execution_accuracy(golds, golds, [DB_ID] * 3, db_dir)
    assert [e["hardness"] for e in summary["per_example"]] == ["easy", "medium", "unknown"]
    assert summary["by_hardness"]["easy"] == {"ex": 1.0, "count": 1}
    assert summary["by_hardness"]["hard"] == {"ex": 0.0, "count": 0}
    assert summary["by_hardness"]["unknown"]["count"] == 1 and summary["ex"] == 1.0


def test_every_sqlite_file_of_the_folder_must_agree(db_dir):
    second = db_dir / DB_ID / "shop_variant.sqlite"
    conn = sqlite3.connect(second)
    conn.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, price REAL, qty INTEGER)")
    conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)", [(1, "a", 9.0, 1), (2, "b", 1.0, 2)])
    conn.commit()
    conn.close()
    gold = "SELECT name FROM items WHERE id = 1"
    # same answer as the gold on shop.sqlite ('a'), a different one on the variant ('b')
    assert score(db_dir, "SELECT name FROM items WHERE price = 1.0", gold)["correct"] is False
    assert score(db_dir, "SELECT name FROM items WHERE qty = 1 AND id < 2", gold)["correct"] is True


def test_only_files_ending_in_sqlite_are_copies_of_the_database(db_dir):
    folder = db_dir / DB_ID
    conn = sqlite3.connect(folder / "shop.sqlite.bak")  # an older copy with other rows: not a copy to agree with
    conn.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, price REAL)")
    conn.commit()
    conn.close()
    for name in ("shop.sqlite-shm", "shop.sqlite-wal", "shop.sqlite.orig", "notes.sqlite.txt"):
        (folder / name).write_bytes(b"\x00" * 100)
    assert database_files(db_dir, DB_ID) == [folder / "shop.sqlite"]
    gold = "SELECT name FROM items ORDER BY id"
    assert check_golds([gold], [DB_ID], db_dir)[0]["error"] == "ok"
    assert score(db_dir, gold, gold)["correct"] is True


# ---------------------------------------------------------------- hostile predictions

def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_hostile_predictions_are_wrong_change_nothing_and_respect_the_timeout(db_dir, tmp_path):
    timeout = 0.5
    new_file = tmp_path / "new.sqlite"
    hostile = [
        "INSERT INTO items VALUES (9, 'x', 1, 1)", "UPDATE items SET qty = 0", "DELETE FROM items",
        "DROP TABLE items", "CREATE TABLE z(a)", f"ATTACH DATABASE '{new_file}' AS other",
        f"VACUUM INTO '{new_file}'", "SELECT load_extension('/tmp/x.so')", "PRAGMA user_version = 3",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
        "SELECT count(*) FROM t a, t b, t c, t d", "SELECT a.x, b.x, c.x FROM t a, t b, t c",
        "SELECT 1; DROP TABLE items",
    ]
    before = snapshot(tmp_path)
    for pred in hostile:
        start = time.monotonic()
        outcome = score(db_dir, pred, "SELECT name FROM items", timeout=timeout, keep_distinct=True)
        assert outcome["correct"] is False, (pred, outcome)
        assert time.monotonic() - start < timeout * 2 + 1.5, pred  # gold + prediction, plus slack
    assert snapshot(tmp_path) == before
    assert not new_file.exists()


# ---------------------------------------------------------------- pool and API checks

def test_worker_pool_gives_the_same_results_as_inline(db_dir):
    preds = ["SELECT name FROM items", "SELECT id FROM items", "", "DELETE FROM items", "SELEC"] * 8
    golds = ["SELECT name FROM items"] * len(preds)
    inline = execution_accuracy(preds, golds, [DB_ID] * len(preds), db_dir, workers=1)
    pooled = execution_accuracy(preds, golds, [DB_ID] * len(preds), db_dir, workers=2)
    assert pooled["per_example"] == inline["per_example"]
    assert inline["errors"] == {"ok": 8, "wrong_result": 8, "empty": 8, "not_read_only": 8, "syntax_error": 8}
    assert inline["ex"] == pytest.approx(0.2)


def test_hanging_predictions_time_out_together_not_one_after_the_other(db_dir):
    """Four predictions that never finish, four workers: about one time limit in all, not four."""
    never_ends = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    start = time.monotonic()
    result = execution_accuracy([never_ends] * 4, ["SELECT name FROM items"] * 4, [DB_ID] * 4, db_dir,
                                timeout=1.0, workers=4)
    assert result["errors"] == {"timeout": 4}
    assert time.monotonic() - start < 3.0  # one after the other would take at least 4 s


def test_bad_python_inputs_raise_user_error(db_dir, tmp_path):
    from scripts.errors import UserError

    with pytest.raises(UserError, match="same length"):
        execution_accuracy(["SELECT 1"], [], [], db_dir)
    with pytest.raises(UserError, match="database folder"):
        execution_accuracy(["SELECT 1"], ["SELECT 1"], [DB_ID], tmp_path / "absent")
    tables = tmp_path / "tables.json"
    tables.write_text(json.dumps([{"db_id": "other"}]))
    with pytest.raises(UserError, match="not in"):
        execution_accuracy(["SELECT 1"], ["SELECT 1"], [DB_ID], db_dir, table_file=tables)


# ---------------------------------------------------------------- CLI

def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "custom_metrics.execution_accuracy", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env,
    )


@pytest.fixture
def cli_files(db_dir, tmp_path):
    gold = tmp_path / "gold.sql"
    gold.write_text(
        "SELECT name FROM items\tshop\n"
        "SELECT id FROM items ORDER BY id\tshop\n"
        "SELECT count(*) FROM items\tshop\n"
        "SELECT 1\twta_1\n"
    )
    pred = tmp_path / "pred.sql"
    pred.write_text("SELECT name FROM items\tignored\nSELECT id FROM items ORDER BY id DESC\n\nSELECT 1\n")
    return gold, pred, db_dir


def test_cli_happy_path_with_per_example_file(cli_files, tmp_path):
    gold, pred, db_dir = cli_files
    out = tmp_path / "per_example.jsonl"
    result = run_cli("--gold", str(gold), "--pred", str(pred), "--db", str(db_dir), "--per-example", str(out))
    assert result.returncode == 0, result.stderr
    assert "execution" in result.stdout and "0.333" in result.stdout and "wta_1 (1)" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False, None]
    assert [r["error"] for r in rows] == ["ok", "wrong_result", "empty", "db_missing"]
    assert all(r["hardness"] in ("easy", "medium", "hard", "extra") for r in rows)


def test_cli_reads_files_with_a_byte_order_mark(cli_files, tmp_path):
    gold, pred, db_dir = cli_files
    tables = tmp_path / "tables.json"
    tables.write_text(json.dumps([{"db_id": DB_ID}, {"db_id": "wta_1"}]))
    for path in (gold, pred, tables):  # as Windows editors save "UTF-8 with BOM"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result = run_cli("--gold", str(gold), "--pred", str(pred), "--db", str(db_dir), "--table", str(tables), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["errors"] == {"ok": 1, "wrong_result": 1, "empty": 1, "db_missing": 1}


def test_cli_json_summary(cli_files):
    gold, pred, db_dir = cli_files
    result = run_cli("--gold", str(gold), "--pred", str(pred), "--db", str(db_dir), "--json", "--workers", "1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["count"] == 3 and summary["ex"] == pytest.approx(1 / 3)
    assert summary["errors"] == {"ok": 1, "wrong_result": 1, "empty": 1, "db_missing": 1}
    assert summary["db_missing"] == {"wta_1": 1}


def test_cli_bad_inputs_exit_with_a_message(cli_files, tmp_path):
    gold, pred, db_dir = cli_files
    short = tmp_path / "short.sql"
    short.write_text("SELECT 1\n")
    malformed = tmp_path / "malformed.sql"
    malformed.write_text("SELECT name FROM items\n")
    cases = [
        (["--gold", str(tmp_path / "nope.sql"), "--pred", str(pred), "--db", str(db_dir)], "not found"),
        (["--gold", str(gold), "--pred", str(short), "--db", str(db_dir)], "lines"),
        (["--gold", str(gold), "--pred", str(pred), "--db", str(tmp_path / "nodb")], "database folder"),
        (["--gold", str(malformed), "--pred", str(short), "--db", str(db_dir)], "line 1"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stdout)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


# ---------------------------------------------------------------- evaluate.load

def test_evaluate_load_offline(db_dir, tmp_path):
    script = f"""
import json, evaluate
metric = evaluate.load({str(REPO_ROOT / 'custom_metrics' / 'execution_accuracy.py')!r})
preds = ["SELECT name FROM items", "SELECT id FROM items"] * 20
golds = ["SELECT name FROM items"] * 40
out = metric.compute(predictions=preds, references=golds, db_ids=["shop"] * 40, db_dir={str(db_dir)!r}, workers=2)
print(json.dumps({{"module": type(metric).__module__, "ex": out["ex"], "errors": out["errors"]}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_EVALUATE_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("evaluate_modules.")  # the copy in evaluate's cache, not the repo module
    assert out["ex"] == 0.5 and out["errors"] == {"ok": 20, "wrong_result": 20}


# ---------------------------------------------------------------- real Spider dev

def test_dev_gold_against_itself(real_spider):
    lines = (real_spider / "dev_gold.sql").read_text().splitlines()
    golds, db_ids = zip(*(line.split("\t") for line in lines))
    summary = execution_accuracy(golds, golds, db_ids, real_spider / "database",
                                 table_file=real_spider / "tables.json")
    assert summary["total"] == 1034 and summary["count"] == 972 and summary["ex"] == 1.0
    assert summary["db_missing"] == {"wta_1": 62}
    missing = [e for d, e in zip(db_ids, summary["per_example"]) if d == "wta_1"]
    assert all(e["correct"] is None and e["error"] == "db_missing" for e in missing)
    assert sum(v["count"] for v in summary["by_hardness"].values()) == 972


def test_remove_distinct_fast_path_on_gold_queries(real_spider):
    lines = (real_spider / "dev_gold.sql").read_text().splitlines()
    lines += (real_spider / "train_gold.sql").read_text().splitlines()[::10]  # a sample keeps it fast
    for query in (line.split("\t")[0] for line in lines):
        official = "".join(t.value for t in sqlparse.parse(query)[0].flatten() if t.value.lower() != "distinct")
        assert remove_distinct(query) == official, query
