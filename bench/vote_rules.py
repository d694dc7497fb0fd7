"""Greedy and voted EX of a results store's stored answers under two SQL extractions and three empty-result vote rules.

Usage: python -m bench.vote_rules RESULTS.sqlite SPIDER_DIR [--old-extraction FILE] [--compare OTHER.sqlite ...]
    [--timeout 30] [--workers 2] [--examples 4]

The model's stored texts (the greedy answer and the sampled candidates of each example) are extracted again, with
the pipeline's extraction (scripts/sql_extraction.py) and with an earlier one loaded from FILE (e.g.
`git show eff7260:scripts/sql_extraction.py > /tmp/old_extraction.py`), so that the two are compared on the
same texts, apart from sampling. Each distinct query is executed once (scripts/voting.run_candidate) and each
distinct (example, SQL) pair scored once (custom_metrics.execution_accuracy); the vote rules reuse the outcomes:

  count_empty  every empty result shares one fingerprint and votes (the rule before 2026-12-04)
  drop_empty   an empty result is dropped like a failed answer (the greedy answer's too)
  empty_last   an empty result votes only when no answer has a non-empty result (scripts/voting.choose)

Printed: EX counts and ratios, answers whose extraction differs (and how many old ones are a sub-part of the new
statement), gained/lost against greedy and between rules with an exact two-sided sign test on the discordant
examples; with --compare, the stored greedy and voted EX and error classes of each store.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import sqlite3
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from math import comb
from pathlib import Path

from custom_metrics.execution_accuracy import database_files, database_path, execution_accuracy
from scripts import sql_extraction
from scripts.voting import Outcome, canonical, choose, fingerprint_of, run_candidate

RULES = ("count_empty", "drop_empty", "empty_last")


# ------------------------------------------------------------------ the store

def read_store(path: Path) -> list[dict]:
    """Every example of the store's (single) run: key, db_id, gold, greedy text and stored SQL, candidates."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    runs = con.execute("SELECT id FROM runs WHERE kind LIKE 'baseline_ex%' OR kind LIKE '%ex@%'").fetchall()
    if len(runs) != 1:
        sys.exit(f"{path}: expected one EX run, found {len(runs)}")
    run_id = runs[0]["id"]
    examples = {r["example_key"]: dict(r, candidates=[]) for r in con.execute(
        "SELECT example_key, db_id, gold_sql, raw_output, extracted_sql, correct, error FROM sql_results "
        "WHERE run_id = ? ORDER BY rowid", (run_id,))}
    samplings = {r[0] for r in con.execute("SELECT DISTINCT sampling FROM sql_candidates WHERE run_id = ?", (run_id,))}
    if len(samplings) > 1:
        sys.exit(f"{path}: more than one sampling setting: {sorted(samplings)}")
    for r in con.execute("SELECT example_key, raw_output, extracted_sql, error FROM sql_candidates WHERE run_id = ? "
                         "ORDER BY example_key, candidate_index", (run_id,)):
        examples[r["example_key"]]["candidates"].append(dict(r))
    votes = {r["example_key"]: dict(r) for r in con.execute(
        "SELECT example_key, voted_sql, correct, error, changed FROM sql_votes WHERE run_id = ?", (run_id,))}
    con.close()
    for key, e in examples.items():
        e["vote"] = votes.get(key)
    return list(examples.values())


def stored_summary(path: Path) -> dict:
    """Greedy and voted EX as stored, gained/lost, and the error classes of answers, votes and candidates."""
    examples = read_store(path)
    scored = [e for e in examples if e["correct"] is not None]
    voted = [e for e in scored if e["vote"] and e["vote"]["correct"] is not None]
    return {
        "store": str(path),
        "greedy": _ratio(sum(e["correct"] for e in scored), len(scored)),
        "voted": _ratio(sum(e["vote"]["correct"] for e in voted), len(voted)),
        "changed": sum(bool(e["vote"]["changed"]) for e in voted),
        "gained": sum(not e["correct"] and e["vote"]["correct"] for e in voted),
        "lost": sum(e["correct"] and not e["vote"]["correct"] for e in voted),
        "greedy_errors": dict(Counter(e["error"] for e in examples).most_common()),
        "voted_errors": dict(Counter(e["vote"]["error"] for e in examples if e["vote"]).most_common()),
        "candidate_errors": dict(Counter(c["error"] for e in examples for c in e["candidates"]).most_common()),
    }


# ------------------------------------------------------------------ extraction, execution, scoring

def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extract_all(extract, examples: list[dict], db_dir: Path) -> tuple[list[str], list[list[str]]]:
    """Greedy SQL and candidate SQLs of every example with one extraction function (text, db_path) -> SQL."""
    greedy, cands = [], []
    for e in examples:
        db_path = database_path(db_dir, e["db_id"])
        greedy.append(extract(e["raw_output"] or "", db_path))
        cands.append([extract(c["raw_output"] or "", db_path) for c in e["candidates"]])
    return greedy, cands


def execute_all(jobs: set[tuple[str, str]], db_files: dict[str, list], timeout: float, workers: int) -> dict:
    """The vote outcome of every distinct (db_id, SQL), executed once, in threads."""
    jobs = sorted(jobs)
    with ThreadPoolExecutor(workers) as pool:
        outcomes = pool.map(lambda job: run_candidate(job[1], db_files[job[0]], timeout), jobs)
        return dict(zip(jobs, outcomes))


def score_all(pairs: set[tuple[int, str]], examples: list[dict], spider: Path, timeout: float,
              workers: int) -> dict:
    """EX (True/False/None) of every distinct (example index, SQL), with the pipeline's metric."""
    pairs = sorted(pairs)
    summary = execution_accuracy([sql for _, sql in pairs], [examples[i]["gold_sql"] for i, _ in pairs],
                                 [examples[i]["db_id"] for i, _ in pairs], spider / "database", timeout=timeout,
                                 table_file=spider / "tables.json", workers=workers)
    return {pair: r for pair, r in zip(pairs, summary["per_example"])}


# ------------------------------------------------------------------ the vote rules

def empty_fingerprint(files: list) -> str:
    """The fingerprint run_candidate gives a query whose result is empty on every one of the files."""
    return fingerprint_of([canonical([], False) for _ in files])


def vote_with(rule: str, greedy_sql: str, greedy: Outcome, sqls: list[str], outcomes: list[Outcome], empty: str):
    """voting.choose, with empty results counted as `rule` says (see the module docstring)."""
    if rule == "empty_last":
        return choose(greedy_sql, greedy, sqls, outcomes)
    if rule == "count_empty":  # an empty result told from no other: it votes like any result
        plain = lambda o: dataclasses.replace(o, empty=False)  # noqa: E731
        return choose(greedy_sql, plain(greedy), sqls, [plain(o) for o in outcomes])
    drop = lambda o: Outcome(None, "empty_result") if o.fingerprint == empty else o  # noqa: E731
    return choose(greedy_sql, drop(greedy), sqls, [drop(o) for o in outcomes])


# ------------------------------------------------------------------ report helpers

def _ratio(n: int, d: int) -> str:
    return f"{n}/{d} = {n / d:.4f}" if d else f"{n}/0"


def sign_test(a: int, b: int) -> float:
    """Two-sided exact binomial p-value of a wins against b wins (ties dropped)."""
    n = a + b
    if n == 0:
        return 1.0
    k = min(a, b)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)


def normalise(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


def compare(name_a: str, a: list, name_b: str, b: list) -> str:
    """`a` right and `b` wrong, the reverse, and the sign test, over the scored examples."""
    wins = sum(x and not y for x, y in zip(a, b))
    losses = sum(y and not x for x, y in zip(a, b))
    return f"{name_a} right & {name_b} wrong: {wins}; reverse: {losses}; sign test p = {sign_test(wins, losses):.3f}"


def short(sql: str, n: int = 110) -> str:
    return sql if len(sql) <= n else sql[: n - 3] + "..."


# ------------------------------------------------------------------ main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", type=Path)
    p.add_argument("spider", type=Path, help="the Spider folder: database/, tables.json")
    p.add_argument("--old-extraction", type=Path, default=Path("/tmp/old_extraction.py"),
                   help="an earlier scripts/sql_extraction.py (its extract_sql is used)")
    p.add_argument("--compare", type=Path, nargs="*", default=[], help="stores whose stored EX to print too")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--examples", type=int, default=4, help="differing extractions to print per direction")
    args = p.parse_args()
    start = time.perf_counter()
    db_dir = args.spider / "database"

    print("== stored results")
    for path in [args.store, *args.compare]:
        print(json.dumps(stored_summary(path)))
    if args.compare:
        base = {e["example_key"]: e for e in read_store(args.store)}
        for path in args.compare:
            other = read_store(path)
            same_g = sum(base[e["example_key"]]["raw_output"] == e["raw_output"] for e in other)
            same_c = sum(c["raw_output"] == d["raw_output"] for e in other
                         for c, d in zip(e["candidates"], base[e["example_key"]]["candidates"]))
            print(f"{path} vs {args.store}: identical greedy texts {same_g}/{len(other)}, identical candidate texts "
                  f"{same_c}/{sum(len(e['candidates']) for e in other)}")

    examples = read_store(args.store)
    old_module = load_module(args.old_extraction, "old_sql_extraction")
    extractions = {"old": extract_all(old_module.extract_sql, examples, db_dir),
                   "new": extract_all(sql_extraction.extract_sql, examples, db_dir)}
    print(f"\n== extraction of {len(examples)} greedy texts and "
          f"{sum(len(e['candidates']) for e in examples)} candidates, twice: {time.perf_counter() - start:.0f} s")
    new_g, new_c = extractions["new"]
    print("new extraction reproduces the stored SQL: greedy "
          f"{sum(s == e['extracted_sql'] for s, e in zip(new_g, examples))}/{len(examples)}, candidates "
          f"{sum(s == c['extracted_sql'] for ss, e in zip(new_c, examples) for s, c in zip(ss, e['candidates']))}"
          f"/{sum(len(e['candidates']) for e in examples)}")
    for which, (g, c) in extractions.items():
        print(f"{which}: no SQL: greedy {sum(not s for s in g)}, candidates {sum(not s for ss in c for s in ss)}")

    db_files = {e["db_id"]: database_files(db_dir, e["db_id"]) or [] for e in examples}
    jobs = {(e["db_id"], s) for g, c in extractions.values() for e, gs, cs in zip(examples, g, c) for s in [gs, *cs]}
    t = time.perf_counter()
    outcome = execute_all(jobs, db_files, args.timeout, args.workers)
    print(f"executed {len(jobs)} distinct (database, SQL): {time.perf_counter() - t:.0f} s")
    empty = {d: empty_fingerprint(files) for d, files in db_files.items()}

    voted: dict[tuple[str, str], list[str]] = {}
    vote_objs: dict[tuple[str, str], list] = {}
    for which, (g, c) in extractions.items():
        for rule in RULES:
            vs = [vote_with(rule, gs, outcome[(e["db_id"], gs)], cs, [outcome[(e["db_id"], s)] for s in cs],
                            empty[e["db_id"]]) for e, gs, cs in zip(examples, g, c)]
            vote_objs[(which, rule)] = vs
            voted[(which, rule)] = [v.sql for v in vs]
    pairs = {(i, s) for sqls in [*[g for g, _ in extractions.values()], *voted.values()] for i, s in enumerate(sqls)}
    t = time.perf_counter()
    scores = score_all(pairs, examples, args.spider, args.timeout, args.workers)
    print(f"scored {len(pairs)} distinct (example, SQL): {time.perf_counter() - t:.0f} s")
    scored = [i for i, e in enumerate(examples) if scores[(i, extractions["new"][0][i])]["correct"] is not None]

    def correct(sqls: list[str]) -> list[bool]:
        return [bool(scores[(i, sqls[i])]["correct"]) for i in scored]

    def errors(sqls: list[str]) -> dict:
        return dict(Counter(scores[(i, sqls[i])]["error"] for i in scored).most_common())

    n = len(scored)
    scored_set = set(scored)
    print(f"\n== 1. greedy EX by extraction (the stored texts of {args.store}; {n} examples with a database)")
    greedy = {w: correct(g) for w, (g, _) in extractions.items()}
    for w in extractions:
        print(f"greedy EX, {w} extraction: {_ratio(sum(greedy[w]), n)}  errors {errors(extractions[w][0])}")
    print(compare("old", greedy["old"], "new", greedy["new"]))
    old_g, old_c = extractions["old"]
    differ = [i for i in scored if old_g[i] != new_g[i]]
    print(f"greedy answers whose extracted SQL differs: {len(differ)} of {n} (of all {len(examples)}: "
          f"{sum(a != b for a, b in zip(old_g, new_g))})")
    kinds = Counter((bool(scores[(i, old_g[i])]["correct"]), bool(scores[(i, new_g[i])]["correct"])) for i in differ)
    print("  of these (old right, new right): " + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())))

    def sub_part(a: str, b: str) -> bool:
        a, b = normalise(a), normalise(b)
        return bool(a) and a != b and a in b

    sub_greedy = sum(sub_part(old_g[i], new_g[i]) for i in scored)
    sub_all = sum(sub_part(a, b) for a, b in zip(old_g, new_g))
    cand_pairs = [(a, b) for xs, ys in zip(old_c, new_c) for a, b in zip(xs, ys)]
    print(f"old greedy SQL a strict sub-part of the new statement: {sub_greedy} of {n} (all examples: {sub_all}); "
          f"candidates: {sum(sub_part(a, b) for a, b in cand_pairs)} of {len(cand_pairs)} "
          f"(differing: {sum(a != b for a, b in cand_pairs)})")
    for want in [(True, False), (False, True), (False, False)]:
        shown = [i for i in differ if (bool(scores[(i, old_g[i])]["correct"]),
                                       bool(scores[(i, new_g[i])]["correct"])) == want][: args.examples]
        label = {(True, False): "old right, new wrong", (False, True): "old wrong, new right",
                 (False, False): "both wrong"}[want]
        for i in shown:
            print(f"  [{label}] {examples[i]['example_key']}\n     old: {short(old_g[i])}"
                  f"\n     new: {short(new_g[i])} ({scores[(i, new_g[i])]['error']})")

    print("\n== 1b/2. voted EX by extraction and empty-result rule")
    results = {}
    for (which, rule), sqls in voted.items():
        results[(which, rule)] = c = correct(sqls)
        g = greedy[which]
        vs = vote_objs[(which, rule)]
        empty_wins = sum(v.fingerprint is not None and v.fingerprint == empty[examples[i]["db_id"]]
                         for i, v in enumerate(vs) if i in scored_set)
        print(f"{which} extraction, {rule:10s}: voted EX {_ratio(sum(c), n)}; vs greedy gained "
              f"{sum(b and not a for a, b in zip(g, c))}, lost {sum(a and not b for a, b in zip(g, c))}; changed "
              f"{sum(vs[i].changed for i in scored)}; empty result wins {empty_wins}; errors {errors(sqls)}")
    for which in extractions:
        for a, b in [("count_empty", "drop_empty"), ("count_empty", "empty_last"), ("drop_empty", "empty_last")]:
            print(f"{which} extraction: " + compare(a, results[(which, a)], b, results[(which, b)]))
    for rule in RULES:
        print(f"{rule}: " + compare("old", results[("old", rule)], "new", results[("new", rule)]))
    stored = [e["vote"]["voted_sql"] if e["vote"] else None for e in examples]
    print(f"new extraction + the rule the store was voted with reproduces its voted SQL: "
          f"{sum(a == b for a, b in zip(voted[('new', 'count_empty')], stored))}/{len(examples)}")
    gold = execute_all({(examples[i]["db_id"], examples[i]["gold_sql"]) for i in scored}, db_files, args.timeout,
                       args.workers)

    def is_empty(table: dict, i: int, sql: str) -> bool:
        return table[(examples[i]["db_id"], sql)].fingerprint == empty[examples[i]["db_id"]]

    gold_empty = [is_empty(gold, i, examples[i]["gold_sql"]) for i in scored]
    print(f"new extraction: greedy answers with an empty result {sum(is_empty(outcome, i, new_g[i]) for i in scored)}"
          f" of {n}; candidates with an empty result {sum(is_empty(outcome, i, s) for i in scored for s in new_c[i])}"
          f" of {sum(len(new_c[i]) for i in scored)}; gold queries with an empty result {sum(gold_empty)} of {n}")
    for which in extractions:
        for a, b in [("count_empty", "drop_empty"), ("count_empty", "empty_last")]:
            ra, rb = results[(which, a)], results[(which, b)]
            split = Counter((x, ge) for x, y, ge in zip(ra, rb, gold_empty) if x != y)
            print(f"{which} extraction, {a} vs {b}, discordant by gold result: {a} right with empty gold "
                  f"{split[(True, True)]}, non-empty gold {split[(True, False)]}; {b} right with empty gold "
                  f"{split[(False, True)]}, non-empty gold {split[(False, False)]}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
