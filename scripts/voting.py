"""Execution-guided voting: result fingerprints of SQL candidates and the pick of the most common result.

A candidate is run the way the EX metric runs a prediction (custom_metrics/execution_accuracy.py: read, operators
repaired, DISTINCT dropped, YEAR(CURDATE()) -> 2020) through the safe executor (custom_metrics/safe_sqlite.py:
read-only, time-limited, capped), on every database file the metric would use. Its fingerprint is a hash of a
canonical form of the rows under the metric's equivalence (`result_eq`): values compared as Python compares them
(1 == 1.0), columns up to a permutation, rows as a bag, or as a list when the query has ORDER BY. So two
candidates that both have ORDER BY, or both have none, get the same fingerprint exactly when the metric, taking
one as the gold query, calls the other's result equal. One with ORDER BY and one without vote apart unless their
results have at most one row (then bag and list are the same; every empty result equals every other).

`vote` counts the greedy answer and the sampled candidates that ran; failures (errors, time-outs, writes, empty
answers) are dropped. The most common fingerprint wins; on a tie the greedy answer's group, then the group met
first among the candidates; when nothing runs, the greedy answer stands.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from math import factorial, prod
from pathlib import Path

from custom_metrics.execution_accuracy import DB_MISSING, EMPTY, executed_sql, order_matters, read_prediction
from custom_metrics.safe_sqlite import EXEC_ERROR, OK, run_query

# Columns whose values are the same bag can be swapped by the metric's column permutation; the canonical form
# tries every order of such columns up to this many, then orders the rest by their values (not exact beyond it).
MAX_ORDERS = 5040


@dataclass(frozen=True)
class Outcome:
    """One executed candidate: its result fingerprint (None when it failed) and error class ('ok' when it ran)."""

    fingerprint: str | None
    error: str


@dataclass(frozen=True)
class Vote:
    """The voted answer of one question, with the outcome of the greedy answer and of each candidate."""

    sql: str  # the chosen SQL: the greedy answer, or the first candidate of the winning group
    fingerprint: str | None  # the winning result (None when nothing ran)
    votes: int  # answers (greedy included) in the winning group
    voters: int  # answers that ran
    changed: bool  # the winning result is not the greedy answer's
    greedy: Outcome
    candidates: list[Outcome]


def run_candidate(sql: str, db_paths: str | Path | Sequence[str | Path], timeout: float = 30.0) -> Outcome:
    """Execute one candidate as the EX metric executes a prediction; its fingerprint, or the error class."""
    paths = [db_paths] if isinstance(db_paths, (str, Path)) else list(db_paths)
    if not paths:
        return Outcome(None, DB_MISSING)
    sql = read_prediction(sql)
    if not sql:
        return Outcome(None, EMPTY)
    try:
        sql = executed_sql(sql)
    except Exception:  # sqlparse limits on hostile input, as the metric counts them
        return Outcome(None, EXEC_ERROR)
    forms = []
    for path in paths:
        result = run_query(path, sql, timeout)
        if not result.ok:
            return Outcome(None, result.error)
        forms.append(canonical(result.rows, order_matters(sql)))
    return Outcome(fingerprint_of(forms), OK)


def fingerprint_of(forms: list) -> str:
    """A short hash of canonical forms (one per database file)."""
    return hashlib.sha256(json.dumps(forms).encode()).hexdigest()[:16]


def canonical(rows: list[tuple], ordered: bool) -> list:
    """A JSON-able form of a result, equal for two results exactly when `result_eq` calls them equal."""
    if not rows:
        return ["empty"]
    table = [[_value(v) for v in row] for row in rows]
    columns = [tuple(column) for column in zip(*table)]
    if ordered and len(rows) > 1:  # lists of rows under a column permutation: the multiset of column sequences
        return ["ordered", sorted(columns)]
    groups: dict[tuple, list[tuple]] = {}  # columns by their bag of values: only those can trade places
    for column in columns:
        groups.setdefault(tuple(sorted(column)), []).append(column)
    keys = sorted(groups)
    best = None
    for order in _arrangements([groups[k] for k in keys]):
        form = sorted(zip(*order))
        if best is None or form < best:
            best = form
    return ["bag", [list(row) for row in best]]


def _value(value) -> str:
    """A value as the metric compares it (an integral float equals its int), as a string that sorts."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return repr(value)


def _arrangements(groups: list[list[tuple]]) -> Iterator[list[tuple]]:
    """Column orders: groups in the given order, every distinct order inside each group (up to MAX_ORDERS)."""
    total = 1
    for group in groups:
        total *= _count_orders(group)
    if total > MAX_ORDERS:  # a pathological result: one fixed order per group
        yield [column for group in groups for column in sorted(group)]
        return
    orders: list[list[tuple]] = [[]]
    for group in groups:
        orders = [done + list(more) for done in orders for more in _distinct_orders(sorted(group))]
    yield from orders


def _count_orders(group: list[tuple]) -> int:
    """How many distinct orders the columns of a group have (identical columns are one)."""
    return factorial(len(group)) // prod(factorial(n) for n in Counter(group).values())


def _distinct_orders(items: list[tuple]) -> Iterator[tuple]:
    """Every distinct permutation of a sorted list, each once."""
    if len(items) <= 1:
        yield tuple(items)
        return
    for i, item in enumerate(items):
        if i and item == items[i - 1]:
            continue
        for rest in _distinct_orders(items[:i] + items[i + 1:]):
            yield (item,) + rest


def vote(greedy_sql: str, candidate_sqls: Sequence[str], db_paths: str | Path | Sequence[str | Path],
         timeout: float = 30.0) -> Vote:
    """The answer whose result is the most common among the greedy answer and the candidates that ran."""
    greedy = run_candidate(greedy_sql, db_paths, timeout)
    outcomes = [run_candidate(sql, db_paths, timeout) for sql in candidate_sqls]
    return choose(greedy_sql, greedy, list(candidate_sqls), outcomes)


def choose(greedy_sql: str, greedy: Outcome, candidate_sqls: list[str], outcomes: list[Outcome]) -> Vote:
    """The vote over executed answers (see the module docstring for the rule)."""
    counts = Counter(o.fingerprint for o in [greedy, *outcomes] if o.fingerprint is not None)
    voters = sum(counts.values())
    if not counts:
        return Vote(greedy_sql, None, 0, 0, False, greedy, outcomes)
    top = max(counts.values())
    if counts.get(greedy.fingerprint) == top:
        return Vote(greedy_sql, greedy.fingerprint, top, voters, False, greedy, outcomes)
    winner = next(i for i, o in enumerate(outcomes) if counts.get(o.fingerprint) == top)
    fingerprint = outcomes[winner].fingerprint
    return Vote(candidate_sqls[winner], fingerprint, top, voters, True, greedy, outcomes)
