"""Benchmark of execution_accuracy on Spider dev (gold vs gold) against a naive sequential reference.

Usage: python -m bench.bench_execution_accuracy [SPIDER_DIR]   (default: $TEXT2SQL_DATA/spider_data)
SPIDER_DIR is the unpacked Spider folder (dev_gold.sql, database/).
The reference does what the official evaluator does per example, the plain way: sqlparse on both
queries, a new sqlite3 connection for every query, one example after the other, no pool, no guards.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

import sqlparse

from custom_metrics.execution_accuracy import (
    database_files,
    execution_accuracy,
    repair_operators,
    replace_cur_year,
    result_eq,
)

DATA_ENV = "TEXT2SQL_DATA"  # a folder holding spider_data/ (as the tests read it)


def load_gold(spider_dir: Path) -> tuple[list[str], list[str]]:
    """dev_gold.sql -> (queries, db_ids)."""
    lines = (spider_dir / "dev_gold.sql").read_text(encoding="utf-8").splitlines()
    queries, db_ids = zip(*(line.split("\t") for line in lines))
    return list(queries), list(db_ids)


def _official_remove_distinct(sql: str) -> str:
    tokens = [token.value for token in sqlparse.parse(sql)[0].flatten()]
    return "".join(token for token in tokens if token.lower() != "distinct")


def _plain_execute(path: Path, sql: str) -> list[tuple] | None:
    """A new connection per query (read-only URI so the Spider databases cannot change), no guards."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    conn.text_factory = lambda b: b.decode(errors="ignore")
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def naive_reference(preds: list[str], golds: list[str], db_ids: list[str], db_dir: Path) -> float:
    """EX computed the plain sequential way."""
    right = scored = 0
    for pred, gold, db_id in zip(preds, golds, db_ids):
        files = database_files(db_dir, db_id)
        if files is None:
            continue
        pred, gold = (replace_cur_year(_official_remove_distinct(repair_operators(q))) for q in (pred, gold))
        order_matters = "order by" in gold.lower()
        ok = True
        for path in files:
            gold_rows, pred_rows = _plain_execute(path, gold), _plain_execute(path, pred)
            if gold_rows is None:
                ok = None
                break
            if pred_rows is None or not result_eq(gold_rows, pred_rows, order_matters):
                ok = False
                break
        if ok is not None:
            scored += 1
            right += bool(ok)
    return right / scored if scored else 0.0


def main(argv: list[str]) -> int:
    if not argv and not os.environ.get(DATA_ENV):
        print(f"error: pass the spider_data folder, or set {DATA_ENV} to the folder holding it", file=sys.stderr)
        return 2
    spider_dir = Path(argv[0]) if argv else Path(os.environ[DATA_ENV]) / "spider_data"
    if not (spider_dir / "dev_gold.sql").is_file():
        print(f"error: {spider_dir / 'dev_gold.sql'} not found; pass the spider_data folder", file=sys.stderr)
        return 2
    golds, db_ids = load_gold(spider_dir)
    db_dir = spider_dir / "database"
    print(f"{len(golds)} dev pairs (gold vs gold), {os.cpu_count()} cores")

    start = time.perf_counter()
    summary = execution_accuracy(golds, golds, db_ids, db_dir)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    summary_one = execution_accuracy(golds, golds, db_ids, db_dir, workers=1)
    ours_one = time.perf_counter() - start
    start = time.perf_counter()
    reference_ex = naive_reference(golds, golds, db_ids, db_dir)
    reference = time.perf_counter() - start

    print(f"execution_accuracy (workers={os.cpu_count()}): {ours:.2f} s, EX {summary['ex']:.3f} over {summary['count']}")
    print(f"execution_accuracy (workers=1): {ours_one:.2f} s, EX {summary_one['ex']:.3f}")
    print(f"naive sequential reference: {reference:.2f} s, EX {reference_ex:.3f}")
    print(f"ratio reference / ours: {reference / ours:.2f}x (workers={os.cpu_count()}), {reference / ours_one:.2f}x (workers=1)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
