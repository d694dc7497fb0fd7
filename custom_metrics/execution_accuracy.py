"""Spider execution accuracy (EX) with the semantics of the official test-suite-sql-eval exec match.

Three ways in:
- Python: `execution_accuracy(predictions, golds, db_ids, db_dir, ...) -> dict` (the pipeline calls it);
- CLI: `python -m custom_metrics.execution_accuracy --gold dev_gold.sql --pred pred.sql --db database/`;
- `evaluate.load("custom_metrics/execution_accuracy.py")`: the `ExecutionAccuracy` metric below.
evaluate.load copies this file into its module cache together with the files named by the relative
imports below (they must stay top-level `from .x import y` lines); that is why both siblings are
imported relatively and `scripts.errors` only optionally.

Per example (default flags of the official evaluator): `> =`, `< =`, `! =` repaired; `YEAR(CURDATE())`
-> 2020; every `distinct` token removed with sqlparse unless keep_distinct; rows compared as lists
when the gold has ORDER BY, else as bags, up to a permutation of the columns; every `*.sqlite` file
of the database folder must agree. A database is `<db_dir>/<db_id>/<db_id>.sqlite` (Spider's layout) or
`<db_dir>/<db_id>.sqlite` (one file). A failing prediction is wrong; a failing gold or a missing
database gives correct=None and is left out of EX. `check_golds` runs the gold queries alone.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import sqlparse

from .safe_sqlite import OK, EXEC_ERROR, run_query
from .spider_hardness import LEVELS, SqlParseError, hardness as spider_hardness

try:
    from scripts.errors import UserError
except ImportError:  # loaded by evaluate.load outside the repository

    class UserError(Exception):
        """A bad input or setting; the message names the file or setting and the fix."""


WRONG_RESULT = "wrong_result"
EMPTY = "empty"
DB_MISSING = "db_missing"
GOLD_ERROR = "gold_error"
ERROR_CLASSES = (
    "ok", WRONG_RESULT, "syntax_error", "unknown_table_or_column", "timeout", EMPTY,
    "not_read_only", "too_large", EXEC_ERROR, DB_MISSING, GOLD_ERROR,
)
UNKNOWN_HARDNESS = "unknown"

# what can make remove_distinct change a query: the word, or a statement break (';' or 'GO')
_NEEDS_SQLPARSE = re.compile(r";|distinct|\bgo\b", re.IGNORECASE)
_CUR_YEAR = re.compile(r"YEAR\s*\(\s*CURDATE\s*\(\s*\)\s*\)\s*", re.IGNORECASE)


# ---------------------------------------------------------------- query normalisation (official)

def repair_operators(sql: str) -> str:
    """Official postprocess: `> =`, `< =`, `! =` -> `>=`, `<=`, `!=`."""
    return sql.replace("> =", ">=").replace("< =", "<=").replace("! =", "!=")


def replace_cur_year(sql: str) -> str:
    """Official replace_cur_year: YEAR(CURDATE()) -> 2020."""
    return _CUR_YEAR.sub("2020", sql)


def remove_distinct(sql: str) -> str:
    """Official remove_distinct: the first sqlparse statement's tokens, without any `distinct` token."""
    if not _NEEDS_SQLPARSE.search(sql):
        return sql  # one statement, nothing to drop: sqlparse would give the text back unchanged
    tokens = [token.value for token in sqlparse.parse(sql)[0].flatten()]
    return "".join(token for token in tokens if token.lower() != "distinct")


def read_prediction(pred: str | None) -> str:
    """Official reading of a prediction: stripped, ` value ` -> ` 1 `."""
    return (pred or "").strip().replace(" value ", " 1 ")


def prediction_from_line(line: str) -> str:
    """Official reading of one prediction line: first tab field, ` value ` -> ` 1 `."""
    return read_prediction(line.strip().split("\t")[0])


def executed_sql(sql: str, keep_distinct: bool = False) -> str:
    """A query as the metric runs it: operators repaired, DISTINCT dropped (unless keep_distinct), YEAR(CURDATE())
    -> 2020; sqlparse may raise on hostile input."""
    sql = repair_operators(sql)
    if not keep_distinct:
        sql = remove_distinct(sql)
    return replace_cur_year(sql)


def order_matters(sql: str) -> bool:
    """Whether results compare as ordered lists: the (gold) query, as executed, has ORDER BY."""
    return "order by" in sql.lower()


# ---------------------------------------------------------------- result comparison (official result_eq)

def _bag(rows) -> Counter:
    return Counter(rows)


def _permutation_exists(gold: list[tuple], pred: list[tuple]) -> bool:
    """Whether some column permutation of pred makes its bag of rows equal to gold's (exact search)."""
    gold_cols, pred_cols = list(zip(*gold)), list(zip(*pred))
    n = len(gold_cols)
    gold_bags, pred_bags = [_bag(c) for c in gold_cols], [_bag(c) for c in pred_cols]
    candidates = [[j for j in range(n) if gold_bags[i] == pred_bags[j]] for i in range(n)]
    if not all(candidates):
        return False
    order = sorted(range(n), key=lambda i: len(candidates[i]))

    def extend(k: int, used: list[int]) -> bool:
        if k == n:
            return True
        i = order[k]
        tried: set = set()
        for j in candidates[i]:
            if j in used or pred_cols[j] in tried:  # identical unused pred columns are interchangeable
                continue
            tried.add(pred_cols[j])
            chosen = used + [j]
            gold_part = _bag(zip(*(gold_cols[order[m]] for m in range(k + 1))))
            pred_part = _bag(zip(*(pred_cols[c] for c in chosen)))
            if gold_part == pred_part and extend(k + 1, chosen):
                return True
        return False

    return extend(0, [])


def result_eq(gold: list[tuple], pred: list[tuple], order_matters: bool) -> bool:
    """Official result_eq: same rows up to a column permutation, as lists if order matters, else as bags."""
    if not gold and not pred:
        return True
    if len(gold) != len(pred) or len(gold[0]) != len(pred[0]):
        return False
    if order_matters:
        if gold == pred:
            return True
        # rows equal as lists under a permutation <=> the columns are the same multiset of sequences
        return _bag(zip(*gold)) == _bag(zip(*pred))
    if _bag(gold) == _bag(pred):
        return True
    return _permutation_exists(gold, pred)


# ---------------------------------------------------------------- scoring one example

def is_plain_name(db_id: str) -> bool:
    """Whether db_id names something directly in the database folder: not empty, '.' or '..', no separator or NUL."""
    return bool(db_id) and db_id not in (".", "..") and not any(c in db_id for c in "/\\\0")


def database_path(db_dir: str | Path, db_id: str) -> Path | None:
    """`<db_id>/<db_id>.sqlite` (Spider's layout) or else `<db_id>.sqlite` under db_dir, when it is a file; else None.

    A db_id that is not a plain name (`../x`, `a/b`, an absolute path) has none: no path outside db_dir is opened."""
    if not is_plain_name(db_id):
        return None
    for path in (Path(db_dir) / db_id / f"{db_id}.sqlite", Path(db_dir) / f"{db_id}.sqlite"):
        if path.is_file():
            return path
    return None


def database_files(db_dir: str | Path, db_id: str) -> list[Path] | None:
    """The files a query of db_id must agree on: every `*.sqlite` of `<db_id>/`, or the one `<db_id>.sqlite`; None if missing.

    Only names that end in `.sqlite` count: `x.sqlite.bak`, `x.sqlite-wal` and `x.sqlite-shm` are not copies."""
    path = database_path(db_dir, db_id)
    if path is None:
        return None
    if path.parent == Path(db_dir):  # the flat layout: one file per database
        return [path]
    return sorted(p for p in path.parent.iterdir() if p.name.endswith(".sqlite") and p.is_file())


def gold_hardness(gold: str) -> str:
    """Official hardness of the gold query, or 'unknown' when it cannot be parsed."""
    try:
        return spider_hardness(gold)
    except SqlParseError:
        return UNKNOWN_HARDNESS


def _outcome(correct: bool | None, error: str, level: str, message: str = "") -> dict:
    return {"correct": correct, "hardness": level, "error": error, "message": message[:300]}


def score_example(pred: str | None, gold: str, db_id: str, db_dir: str, timeout: float, keep_distinct: bool) -> dict:
    """One example: {'correct': bool | None, 'hardness', 'error', 'message'}; pred None checks the gold alone."""
    level = gold_hardness(gold)
    files = database_files(db_dir, db_id)
    if files is None:
        return _outcome(None, DB_MISSING, level, f"neither {Path(db_dir) / db_id / (db_id + '.sqlite')} nor "
                                                 f"{Path(db_dir) / (db_id + '.sqlite')} exists")
    check_only = pred is None  # check_golds: the gold query alone, prepared and run exactly as when scoring
    pred = gold if check_only else pred.strip()
    if not pred:
        return _outcome(False, EMPTY, level)
    try:
        gold = executed_sql(gold, keep_distinct)
    except Exception as exc:  # sqlparse limits on hostile input
        return _outcome(None, GOLD_ERROR, level, f"sqlparse: {exc}")
    try:
        pred = executed_sql(pred, keep_distinct)
    except Exception as exc:
        return _outcome(False, EXEC_ERROR, level, f"sqlparse: {exc}")
    ordered = order_matters(gold)
    for path in files:
        gold_result = run_query(path, gold, timeout)
        if not gold_result.ok:
            return _outcome(None, GOLD_ERROR, level, f"{path.name}: {gold_result.error}: {gold_result.message}")
        if check_only:
            continue
        pred_result = run_query(path, pred, timeout)
        if not pred_result.ok:
            return _outcome(False, pred_result.error, level, pred_result.message)
        if not result_eq(gold_result.rows, pred_result.rows, ordered):
            return _outcome(False, WRONG_RESULT, level)
    return _outcome(True, OK, level)


def _score_chunk(args: tuple) -> list[dict]:
    """Worker entry: score a contiguous chunk of examples."""
    items, db_dir, timeout, keep_distinct = args
    return [score_example(p, g, d, db_dir, timeout, keep_distinct) for p, g, d in items]


# ---------------------------------------------------------------- many examples

def _chunks(items: list, workers: int) -> list[list]:
    """About four chunks per worker, contiguous so that a worker reuses its open connections."""
    size = max(1, -(-len(items) // (workers * 4)))
    return [items[i : i + size] for i in range(0, len(items), size)]


def score_all(items: list[tuple[str, str, str]], db_dir: str, timeout: float, keep_distinct: bool,
              workers: int | None) -> list[dict]:
    """Score (pred, gold, db_id) triples, in parallel threads when more than one worker."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(items)))
    if workers == 1:
        return _score_chunk((items, db_dir, timeout, keep_distinct))
    jobs = [(chunk, db_dir, timeout, keep_distinct) for chunk in _chunks(items, workers)]
    # threads, not processes: SQLite runs outside Python's lock, so slow queries overlap across cores, and a
    # thread costs nothing to start (a spawned process re-imports the caller's main module: ~25 s under main.py)
    with ThreadPoolExecutor(workers) as pool:
        return [outcome for chunk in pool.map(_score_chunk, jobs) for outcome in chunk]


def check_golds(golds: Sequence[str], db_ids: Sequence[str], db_dir: str | Path, *, timeout: float = 30.0,
                keep_distinct: bool = False, workers: int | None = None) -> list[dict]:
    """Whether each gold query runs on its database as scoring runs it: per example `ok`, `db_missing` or `gold_error`."""
    items = [(None, gold, db_id) for gold, db_id in zip(golds, db_ids)]
    return score_all(items, str(db_dir), timeout, keep_distinct, workers) if items else []


def summarize(per_example: list[dict], db_ids: Sequence[str]) -> dict:
    """EX overall and by hardness over the scored examples, counts by error class, missing databases."""
    scored = [e for e in per_example if e["correct"] is not None]
    by_hardness = {}
    levels = list(LEVELS) + ([UNKNOWN_HARDNESS] if any(e["hardness"] == UNKNOWN_HARDNESS for e in scored) else [])
    for level in levels:
        group = [e for e in scored if e["hardness"] == level]
        by_hardness[level] = {"ex": _mean(group), "count": len(group)}
    missing = Counter(d for d, e in zip(db_ids, per_example) if e["error"] == DB_MISSING)
    return {
        "ex": _mean(scored),
        "count": len(scored),
        "total": len(per_example),
        "by_hardness": by_hardness,
        "errors": dict(Counter(e["error"] for e in per_example)),
        "db_missing": dict(missing),
        "per_example": per_example,
    }


def _mean(examples: list[dict]) -> float:
    return sum(bool(e["correct"]) for e in examples) / len(examples) if examples else 0.0


def _known_db_ids(table_file: str | Path) -> set[str]:
    path = Path(table_file)
    try:
        return {entry["db_id"] for entry in json.loads(path.read_text(encoding="utf-8-sig"))}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read the Spider tables file {path}: {exc}; pass the tables.json of the data set") from exc


def _check_inputs(predictions, golds, db_ids, db_dir, table_file) -> None:
    if not (len(predictions) == len(golds) == len(db_ids)):
        raise UserError(
            f"predictions ({len(predictions)}), golds ({len(golds)}) and db_ids ({len(db_ids)}) "
            "must have the same length: one prediction per gold query"
        )
    if db_dir is None or not Path(db_dir).is_dir():
        raise UserError(f"database folder {db_dir} not found: pass the Spider `database` folder (db_dir / --db)")
    unplain = sorted({d for d in db_ids if not is_plain_name(d)})
    if unplain:
        raise UserError(f"db_ids {unplain[:5]} are not plain names: a db_id names <db_id>/<db_id>.sqlite or "
                        "<db_id>.sqlite in the database folder, without '/', '\\' or '..'")
    if table_file:
        unknown = sorted(set(db_ids) - _known_db_ids(table_file))
        if unknown:
            raise UserError(f"db_ids {unknown[:5]} are not in {table_file}: check that gold and tables file match")


def execution_accuracy(
    predictions: Sequence[str],
    golds: Sequence[str],
    db_ids: Sequence[str],
    db_dir: str | Path,
    *,
    timeout: float = 30.0,
    keep_distinct: bool = False,
    table_file: str | Path | None = None,
    workers: int | None = None,
) -> dict:
    """Official Spider EX of predictions against gold queries (keys: ex, count, by_hardness, errors, per_example).

    Predictions are stripped and ` value ` becomes ` 1 ` as in the official reader. `table_file`
    (tables.json), when given, is used to check that every db_id is known.
    """
    predictions, golds, db_ids = list(predictions), list(golds), list(db_ids)
    _check_inputs(predictions, golds, db_ids, db_dir, table_file)
    preds = [read_prediction(p) for p in predictions]
    items = list(zip(preds, golds, db_ids))
    per_example = score_all(items, str(db_dir), timeout, keep_distinct, workers) if items else []
    return summarize(per_example, db_ids)


# ---------------------------------------------------------------- evaluate.load

_DESCRIPTION = "Spider execution accuracy with the official test-suite-sql-eval semantics, run read-only."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted SQL strings.
    references: gold SQL strings.
    db_ids: the Spider db_id of each example.
    db_dir: the Spider `database` folder.
    timeout, keep_distinct, table_file, workers: as in execution_accuracy().
Returns: dict with ex, count, by_hardness, errors, db_missing, per_example.
"""


def _metric_class() -> type:
    """Build the evaluate.Metric subclass (evaluate and datasets are imported only here: they are slow)."""
    import datasets
    import evaluate

    class ExecutionAccuracy(evaluate.Metric):
        """evaluate.Metric wrapper of execution_accuracy()."""

        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation="Zhong, Yu, Klein. Semantic Evaluation for Text-to-SQL with Distilled Test Suites. EMNLP 2020.",
                inputs_description=_KWARGS_DESCRIPTION,
                features=datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            )

        def _compute(self, predictions, references, db_ids=None, db_dir=None, timeout=30.0, keep_distinct=False,
                     table_file=None, workers=None) -> dict:
            if db_ids is None:
                raise UserError("execution_accuracy needs db_ids=[...] (one Spider db_id per reference)")
            return execution_accuracy(predictions, references, db_ids, db_dir, timeout=timeout,
                                      keep_distinct=keep_distinct, table_file=table_file, workers=workers)

    return ExecutionAccuracy


def __getattr__(name: str):
    """`from custom_metrics.execution_accuracy import ExecutionAccuracy` builds the class on first use."""
    if name == "ExecutionAccuracy":
        globals()[name] = _metric_class()
        return globals()[name]
    raise AttributeError(name)


# evaluate.load looks for the class in the module's namespace; evaluate is already imported then.
# Imported without evaluate (the CLI, the pipeline), it stays free of evaluate's start-up cost.
if "evaluate" in sys.modules:
    ExecutionAccuracy = _metric_class()


# ---------------------------------------------------------------- CLI

def read_gold(path: Path) -> tuple[list[str], list[str]]:
    """GOLD lines `SQL<TAB>db_id` -> (queries, db_ids)."""
    queries, db_ids = [], []
    for number, line in enumerate(_read_lines(path, "--gold"), start=1):
        fields = line.strip().split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[-1].strip():
            raise UserError(f"{path} line {number}: expected `SQL<TAB>db_id`, got {line.strip()[:80]!r}")
        if not is_plain_name(fields[-1].strip()):
            raise UserError(f"{path} line {number}: db_id {fields[-1].strip()!r} is not a plain name (no '/', '\\' "
                            "or '..'); it names <db_id>/<db_id>.sqlite or <db_id>.sqlite in the --db folder")
        queries.append(fields[0])
        db_ids.append(fields[-1].strip())
    return queries, db_ids


def _read_lines(path: Path, option: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"{option} file {path} not found")
    return path.read_text(encoding="utf-8-sig", errors="replace").splitlines()  # a BOM is not part of the first line


def format_summary(summary: dict) -> str:
    """The official evaluator's table (count and execution by hardness) plus error classes."""
    levels = list(summary["by_hardness"]) + ["all"]
    counts = [summary["by_hardness"][lv]["count"] for lv in levels[:-1]] + [summary["count"]]
    scores = [summary["by_hardness"][lv]["ex"] for lv in levels[:-1]] + [summary["ex"]]
    lines = [
        f"{'':20} " + " ".join(f"{lv:<10}" for lv in levels),
        f"{'count':20} " + " ".join(f"{c:<10d}" for c in counts),
        f"{'execution':20} " + " ".join(f"{s:<10.3f}" for s in scores),
        "errors: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["errors"].items())),
    ]
    if summary["db_missing"]:
        missing = ", ".join(f"{k} ({v})" for k, v in sorted(summary["db_missing"].items()))
        lines.append(f"excluded, database missing: {missing}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m custom_metrics.execution_accuracy",
        description="Spider execution accuracy (official test-suite-sql-eval semantics, read-only execution).",
    )
    parser.add_argument("--gold", required=True, type=Path, help="lines `SQL<TAB>db_id` (e.g. dev_gold.sql)")
    parser.add_argument("--pred", required=True, type=Path, help="one predicted SQL per line, same order")
    parser.add_argument("--db", required=True, type=Path,
                        help="database folder (<db>/<db_id>/<db_id>.sqlite or <db>/<db_id>.sqlite)")
    parser.add_argument("--table", type=Path, default=None, help="tables.json: check that every db_id is known")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per query (default 30)")
    parser.add_argument("--keep-distinct", action="store_true", help="do not remove DISTINCT before executing")
    parser.add_argument("--per-example", type=Path, default=None, help="write one JSON object per gold line")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--workers", type=int, default=None, help="threads running queries (default: all cores)")
    return parser.parse_args(argv)


def run_cli(args: argparse.Namespace) -> dict:
    """Read the files, score, write/print the results; raises UserError on bad input."""
    golds, db_ids = read_gold(args.gold)
    preds = [prediction_from_line(line) for line in _read_lines(args.pred, "--pred")]
    if len(preds) != len(golds):
        raise UserError(f"{args.pred} has {len(preds)} lines but {args.gold} has {len(golds)}: one prediction per gold line")
    if args.table is not None and not args.table.is_file():
        raise UserError(f"--table file {args.table} not found")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.timeout <= 0:
        raise UserError("--timeout must be a positive number of seconds")
    summary = execution_accuracy(preds, golds, db_ids, args.db, timeout=args.timeout, keep_distinct=args.keep_distinct,
                                 table_file=args.table, workers=args.workers)
    if args.per_example:
        with args.per_example.open("w", encoding="utf-8") as out:
            for db_id, example in zip(db_ids, summary["per_example"]):
                out.write(json.dumps({"db_id": db_id, **example}) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_example"}, indent=2))
    else:
        print(format_summary(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 when it ran, 2 with a message (no traceback) on bad input."""
    try:
        run_cli(parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
