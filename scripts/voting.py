"""Execution-guided voting: candidates sampled and stored, their result fingerprints, the most common result wins.

A candidate is run the way the EX metric runs a prediction (custom_metrics/execution_accuracy.py: read, operators
repaired, DISTINCT dropped, YEAR(CURDATE()) -> 2020) through the safe executor (custom_metrics/safe_sqlite.py:
read-only, time-limited, capped), on every database file the metric would use. Its fingerprint is a hash of a
canonical form of the rows under the metric's equivalence (`result_eq`): values compared as Python compares them
(1 == 1.0), columns up to a permutation, rows as a bag, or as a list when the query has ORDER BY. So two
candidates that both have ORDER BY, or both have none, get the same fingerprint exactly when the metric, taking
one as the gold query, calls the other's result equal. One with ORDER BY and one without vote apart unless their
results have at most one row (then bag and list are the same; every empty result equals every other).

`vote` counts the greedy answer and the sampled candidates that ran; failures (errors, time-outs, writes, empty
answers) are dropped, and so are empty results unless no answer has a non-empty one (several wrong empty results
would otherwise outvote a right non-empty answer: on Qwen2.5-Coder-0.5B's Spider dev answers this rule gained 12
of 972 against counting empty results like any other, docs/RESULTS.md). The most common fingerprint wins; on a tie
the greedy answer's group, then the group met first among the candidates; when nothing runs, the greedy answer
stands.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import factorial, prod
from pathlib import Path

from custom_metrics.execution_accuracy import (DB_MISSING, EMPTY, database_files, executed_sql, order_matters,
                                               read_prediction)
from custom_metrics.safe_sqlite import EXEC_ERROR, OK, run_query
from scripts.answers import example_key, extract_answers, extraction_counts, generate_stored, recover, score
from scripts.databases import SpiderLayout
from scripts.generation import Sampling
from scripts.store import Spool

log = logging.getLogger(__name__)

# Columns whose values are the same bag can be swapped by the metric's column permutation; the canonical form
# tries every order of such columns up to this many, then orders the rest by their values (not exact beyond it).
MAX_ORDERS = 5040


@dataclass(frozen=True)
class Outcome:
    """One executed candidate: its result fingerprint (None when it failed), error class ('ok' when it ran), and
    whether its result was empty (on every database file)."""

    fingerprint: str | None
    error: str
    empty: bool = False


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
    forms, empty = [], True
    for path in paths:
        result = run_query(path, sql, timeout)
        if not result.ok:
            return Outcome(None, result.error)
        forms.append(canonical(result.rows, order_matters(sql)))
        empty = empty and not result.rows
    return Outcome(fingerprint_of(forms), OK, empty)


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
    ran = [o for o in [greedy, *outcomes] if o.fingerprint is not None]
    if any(not o.empty for o in ran):  # empty results vote only when no answer has a non-empty one
        ran = [o for o in ran if not o.empty]
    counts = Counter(o.fingerprint for o in ran)
    voters = sum(counts.values())
    if not counts:
        return Vote(greedy_sql, None, 0, 0, False, greedy, outcomes)
    top = max(counts.values())
    if counts.get(greedy.fingerprint) == top:
        return Vote(greedy_sql, greedy.fingerprint, top, voters, False, greedy, outcomes)
    winner = next(i for i, o in enumerate(outcomes) if counts.get(o.fingerprint) == top)
    fingerprint = outcomes[winner].fingerprint
    return Vote(candidate_sqls[winner], fingerprint, top, voters, True, greedy, outcomes)


# ------------------------------------------------------------------ the voting stage of one evaluation set

def vote_sampling(settings) -> Sampling | None:
    """The sampling of execution-guided voting, or None when it is off (NUM_CANDIDATES 0 or 1)."""
    if settings.num_candidates < 2:
        return None
    return Sampling(n=settings.num_candidates, temperature=settings.vote_temperature, top_p=settings.vote_top_p,
                    seed=settings.seed)


def sampling_config(sampling: Sampling) -> dict:
    """The sampling settings of a vote, as stored with its candidates (n, temperature, top_p, seed)."""
    return dataclasses.asdict(sampling)


def sample_candidates(model, tokenizer, prompts: Sequence[str], examples: Sequence[dict], store, run_id: int | None,
                      sampling: Sampling, resume: bool, spool: Spool | None, **generate_kwargs) -> list | None:
    """n sampled answers per prompt, (texts, seconds) each; those the store holds for these settings are reused.

    None on the other processes of a launch (the main process has every example's candidates)."""
    config = sampling_config(sampling)
    keys = [example_key(e) for e in examples]
    add = (lambda rows: store.add_candidates(run_id, config, rows)) if store else None
    recover(spool, add, resume, "candidates")
    stored: dict[str, dict[int, dict]] = {}
    for row in store.candidate_rows(run_id, config) if store and resume else []:
        if row["raw_output"] is not None:
            stored.setdefault(row["example_key"], {})[row["candidate_index"]] = row
    candidates = []
    for key in keys:
        have = stored.get(key, {})
        complete = all(j in have for j in range(sampling.n))
        candidates.append(([have[j]["raw_output"] for j in range(sampling.n)],
                           sum(have[j]["latency_s"] or 0.0 for j in range(sampling.n))) if complete else None)
    if stored:
        log.info("resuming: candidates of %d of %d examples already in the store",
                 sum(c is not None for c in candidates), len(candidates))

    def rows(i: int, texts: list[str], seconds: float) -> list[dict]:
        return [{"example_key": keys[i], "candidate_index": j, "raw_output": text, "latency_s": seconds / len(texts)}
                for j, text in enumerate(texts)]

    return generate_stored(model, tokenizer, prompts, candidates, rows, add, spool, sampling=sampling,
                           **generate_kwargs)


def vote_and_score(examples: Sequence[dict], layout: SpiderLayout, greedy_sqls: list[str], greedy_results: list[dict],
                   candidates: list, sampling: Sampling, *, timeout: float = 30.0, store=None,
                   run_id: int | None = None) -> dict:
    """Extract and execute every candidate, vote per example, score the voted answers with the same metric.

    Returns the voted EX summary (`ex`, `count`, `by_hardness`, `errors`), how many answers the vote `changed`,
    `gained` (greedy wrong, voted right) and `lost`, and `seconds`: the candidates' generation time (as stored)
    plus this extraction, execution and scoring. Candidates and votes go to the store with their fingerprints.
    """
    start = time.perf_counter()
    texts = [c[0] for c in candidates]
    extractions = [extract_answers(ts, [e] * len(ts), layout) for ts, e in zip(texts, examples)]
    candidate_sqls = [[x.sql for x in xs] for xs in extractions]
    db_files = {e["db_id"]: database_files(layout.database_dir, e["db_id"]) or [] for e in examples}

    def one(i: int) -> Vote:
        return vote(greedy_sqls[i], candidate_sqls[i], db_files[examples[i]["db_id"]], timeout)

    # threads: SQLite runs outside Python's lock, so slow candidates time out together (as in the metric)
    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, len(examples)))) as pool:
        votes = list(pool.map(one, range(len(examples))))
    summary = score(examples, [v.sql for v in votes], layout, timeout=timeout)
    per_example = summary.pop("per_example")
    if store:
        store_votes(store, run_id, sampling, examples, candidates, candidate_sqls, votes, per_example)
    pairs = [(g["correct"], r["correct"]) for g, r in zip(greedy_results, per_example) if r["correct"] is not None]
    summary.update(
        changed=sum(v.changed for v in votes),
        gained=sum(not g and r for g, r in pairs),
        lost=sum(g and not r for g, r in pairs),
        seconds=round(sum(c[1] or 0.0 for c in candidates) + time.perf_counter() - start, 1),
        extraction=extraction_counts([x for xs in extractions for x in xs]),  # of the candidates
        **sampling_config(sampling),
    )
    return summary


def store_votes(store, run_id: int | None, sampling: Sampling, examples: Sequence[dict], candidates: list,
                candidate_sqls: list[list[str]], votes: list[Vote], per_example: list[dict]) -> None:
    """Every candidate with its SQL, fingerprint and error class, and one vote per example, into the store."""
    config = sampling_config(sampling)
    keys = [example_key(e) for e in examples]
    store.add_candidates(run_id, config, [
        {"example_key": key, "candidate_index": j, "raw_output": text, "extracted_sql": sql,
         "fingerprint": outcome.fingerprint, "error": outcome.error, "latency_s": candidates[i][1] / sampling.n}
        for i, key in enumerate(keys)
        for j, (text, sql, outcome) in enumerate(zip(candidates[i][0], candidate_sqls[i], votes[i].candidates))])
    store.add_votes(run_id, config, [
        {"example_key": key, "greedy_fingerprint": v.greedy.fingerprint, "voted_sql": v.sql,
         "fingerprint": v.fingerprint, "votes": v.votes, "voters": v.voters, "changed": v.changed,
         "correct": result["correct"], "error": result["error"]}
        for key, v, result in zip(keys, votes, per_example)])
