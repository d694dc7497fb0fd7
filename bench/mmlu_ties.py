"""Exact ties between the two best letters in the MMLU log-likelihoods of a results store, per run.

Usage: python -m bench.mmlu_ties RESULTS.sqlite [--run-id N]
A tie means the prediction fell to the first letter by default (scores quantized by a low-precision head, e.g. bf16
log-likelihoods in steps of 0.125). Printed per MMLU run: questions, exact ties, ties within 1e-6, accuracy.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path


def tie_counts(db_path: Path, run_id: int | None = None) -> list[dict]:
    """One row per MMLU run of the store: its questions, exact top-two ties, near ties and accuracy."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    query = "SELECT run_id, loglikelihoods, correct FROM mmlu_results" + (" WHERE run_id = ?" if run_id else "")
    runs: dict[int, dict] = {}
    for rid, loglikelihoods, correct in con.execute(query, (run_id,) if run_id else ()):
        row = runs.setdefault(rid, {"run_id": rid, "questions": 0, "exact_ties": 0, "ties_1e-6": 0, "correct": 0})
        top = sorted(json.loads(loglikelihoods), reverse=True)[:2]
        row["questions"] += 1
        row["exact_ties"] += top[0] == top[1]
        row["ties_1e-6"] += top[0] - top[1] < 1e-6
        row["correct"] += bool(correct)
    con.close()
    for row in runs.values():
        row["accuracy"] = round(row["correct"] / row["questions"], 4)
    return list(runs.values())


def main() -> None:
    """Print the tie counts of every MMLU run (or one) in the store."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("db", type=Path)
    p.add_argument("--run-id", type=int, default=None)
    args = p.parse_args()
    for row in tie_counts(args.db, args.run_id):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
