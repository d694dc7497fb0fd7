"""Execution-guided voting (scripts/voting.py) on hand-made candidates against a small SQLite database the test writes.

Covered: the majority result wins; failing candidates are dropped; a tie goes to the greedy answer's group, then to
the group met first; the greedy answer stands when nothing runs; row order counts only with ORDER BY; a candidate
that writes is a failure and the file is unchanged; and the fingerprint's equality is the EX metric's (every pair
of a set of queries, against `score_example` with one of them as gold).
"""
import hashlib
import sqlite3
from itertools import combinations

import pytest

from custom_metrics.execution_accuracy import score_example
from scripts.voting import Outcome, canonical, run_candidate, vote

SINGERS = [("Joe", "France", 30, 1.5), ("Ann", "Germany", 41, 2.0), ("Bo", "France", 25, 2.0), ("Cy", "Peru", 41, 3.25)]
OLDER = "SELECT name FROM singer WHERE age > 28"  # Joe, Ann, Cy
OLDER_TOO = "SELECT name FROM singer WHERE NOT age <= 28"  # the same rows
FRENCH = "SELECT name FROM singer WHERE country = 'France'"  # Joe, Bo
FRENCH_TOO = "SELECT name FROM singer WHERE country LIKE 'france'"
COUNT = "SELECT count(*) FROM singer"


def write_db(path, rows=SINGERS):
    """A singer table as a Spider database file."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE singer (name TEXT, country TEXT, age INTEGER, rating REAL)")
    conn.executemany("INSERT INTO singer VALUES (?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def db(tmp_path):
    """The database folder as the metric sees it (<dir>/<db_id>/<db_id>.sqlite) and its file."""
    (tmp_path / "concert").mkdir()
    return write_db(tmp_path / "concert" / "concert.sqlite")


def test_the_most_common_result_wins_with_its_first_candidate(db):
    result = vote(OLDER, [FRENCH, COUNT, FRENCH_TOO, OLDER_TOO, FRENCH], db)
    assert result.sql == FRENCH and result.changed  # 3 votes against 2 (greedy + OLDER_TOO) and 1
    assert (result.votes, result.voters) == (3, 6)
    assert result.fingerprint == result.candidates[0].fingerprint == result.candidates[2].fingerprint
    assert result.greedy.fingerprint == result.candidates[3].fingerprint != result.fingerprint
    assert len({o.fingerprint for o in result.candidates}) == 3


def test_failing_candidates_are_dropped_and_keep_their_error_class(db):
    failing = ["SELEC name FROM singer", "SELECT name FROM nowhere", "", "SELECT name FROM singer WHERE age > ?"]
    result = vote(OLDER, failing + [FRENCH, FRENCH_TOO], db)
    assert result.sql == FRENCH and (result.votes, result.voters) == (2, 3)
    assert [o.error for o in result.candidates[:4]] == ["syntax_error", "unknown_table_or_column", "empty", "exec_error"]
    assert all(o.fingerprint is None for o in result.candidates[:4])
    # five failures do not outvote one answer that runs
    assert vote(OLDER, failing + ["SELEC 1"], db).sql == OLDER


def test_a_tie_goes_to_the_greedy_answers_group_then_to_the_group_met_first(db):
    result = vote(OLDER, [FRENCH, FRENCH_TOO, OLDER_TOO], db)  # 2 against 2
    assert result.sql == OLDER and not result.changed and result.votes == 2
    result = vote("SELECT nope FROM singer", [COUNT, FRENCH, FRENCH_TOO, COUNT], db)  # greedy failed: 2 against 2
    assert result.sql == COUNT and result.changed and result.greedy == Outcome(None, "unknown_table_or_column")


def test_the_greedy_answer_stands_when_nothing_runs(db):
    result = vote("SELECT nope FROM singer", ["SELEC 1", "DELETE FROM singer", ""], db)
    assert result.sql == "SELECT nope FROM singer" and result.fingerprint is None
    assert (result.votes, result.voters, result.changed) == (0, 0, False)
    assert vote(OLDER, [FRENCH], []).greedy == Outcome(None, "db_missing")  # no database file at all


def test_row_order_counts_only_with_order_by(db):
    def rows(sql):
        with sqlite3.connect(db) as conn:
            return conn.execute(sql).fetchall()

    by_rowid, by_name = "SELECT name FROM singer", "SELECT name FROM singer GROUP BY name"
    assert rows(by_rowid) != rows(by_name) and sorted(rows(by_rowid)) == sorted(rows(by_name))  # same bag, other order
    assert run_candidate(by_rowid, db) == run_candidate(by_name, db)
    young_first, old_first = "SELECT name FROM singer ORDER BY age", "SELECT name FROM singer ORDER BY age DESC"
    assert run_candidate(young_first, db).fingerprint != run_candidate(old_first, db).fingerprint
    assert run_candidate(young_first, db) == run_candidate("SELECT name FROM singer ORDER BY age, rating", db)
    assert run_candidate(young_first, db).fingerprint != run_candidate(by_rowid, db).fingerprint
    assert vote(young_first, [old_first, old_first + ", name"], db).sql == old_first
    # one row: a list and a bag are the same thing
    assert run_candidate("SELECT max(age) FROM singer ORDER BY 1", db) == run_candidate("SELECT max(age) FROM singer", db)


def test_a_candidate_that_writes_fails_and_the_database_is_unchanged(db):
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    writes = ["DELETE FROM singer", "UPDATE singer SET age = 0", "INSERT INTO singer VALUES ('x', 'y', 1, 1.0)",
              "DROP TABLE singer", "CREATE TABLE t (a)", "PRAGMA journal_mode = DELETE", "ATTACH 'other.db' AS o"]
    result = vote(COUNT, writes * 2, db)
    assert result.sql == COUNT and result.voters == 1
    assert all(o == Outcome(None, "not_read_only") for o in result.candidates[:5])
    assert all(o.fingerprint is None and o.error != "ok" for o in result.candidates)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(db.parent.iterdir()) == [db]  # no journal, no attached file created


def test_every_database_file_of_the_example_must_agree(db, tmp_path):
    other = write_db(db.parent / "concert_other.sqlite", SINGERS[:3])  # as test-suite databases come
    same_here, differs_there = COUNT, "SELECT 4"
    assert run_candidate(same_here, db) == run_candidate(differs_there, db)
    assert run_candidate(same_here, [db, other]) != run_candidate(differs_there, [db, other])


QUERIES = [  # results that the metric's rules (values, DISTINCT, columns, order, duplicates) make equal or not
    "SELECT name, age FROM singer",
    "SELECT age, name FROM singer",
    "SELECT name, age FROM singer GROUP BY name",
    "SELECT name, age FROM singer ORDER BY age",
    "SELECT age, name FROM singer ORDER BY age, name",
    "SELECT name, age FROM singer ORDER BY age DESC",
    "SELECT country FROM singer",
    "SELECT DISTINCT country FROM singer",  # the metric drops DISTINCT, so this equals the one above
    "SELECT country FROM singer GROUP BY country",
    "SELECT age, age FROM singer",
    "SELECT age, 41 FROM singer",
    "SELECT 41, age FROM singer",
    "SELECT rating FROM singer WHERE rating = 2",
    "SELECT CAST(rating AS INTEGER) FROM singer WHERE rating = 2",  # 2 equals 2.0
    "SELECT CAST(rating AS TEXT) FROM singer WHERE rating = 2",  # '2.0' does not
    "SELECT name FROM singer WHERE age > 100",
    "SELECT age, name FROM singer WHERE age > 100",  # every empty result is equal
    "SELECT count(*) FROM singer",
    "SELECT 4.0",
    "SELECT age FROM singer",
    "SELECT age FROM singer WHERE age > 28 UNION ALL SELECT age FROM singer WHERE age <= 28",
    "SELECT age FROM singer WHERE age > 28",
    "SELECT max(age), min(age) FROM singer",
    "SELECT min(age), max(age) FROM singer ORDER BY 1",
]


def test_same_fingerprint_exactly_when_the_metric_calls_the_results_equal(db):
    fingerprints = {sql: run_candidate(sql, db).fingerprint for sql in QUERIES}
    assert None not in fingerprints.values()
    compared = equal = 0
    for a, b in combinations(QUERIES, 2):
        if ("ORDER BY" in a) != ("ORDER BY" in b):
            continue  # the metric compares by the gold's ORDER BY; candidates with and without one vote apart
        compared += 1
        metric = score_example(a, b, "concert", str(db.parent.parent), 30.0, False)["correct"]
        assert metric == score_example(b, a, "concert", str(db.parent.parent), 30.0, False)["correct"], (a, b)
        assert (fingerprints[a] == fingerprints[b]) == metric, (a, b)
        equal += metric
    assert compared == 196 and equal == 10, equal  # the equal pairs the comments above name


def test_canonical_form_tries_every_order_of_columns_with_the_same_values():
    # columns a and b hold the same bag, so only their pairing with c tells the two results apart
    first = [(1, 2, "x"), (2, 1, "y")]
    swapped = [(1, 2, "y"), (2, 1, "x")]  # a and b exchanged (and the rows reordered): equal up to a permutation
    paired = [(1, 1, "x"), (2, 2, "y")]  # every column the same bag as in `first`, but a = b in each row
    assert canonical(first, False) == canonical(swapped, False)
    assert canonical(first, False) != canonical(paired, False)
    assert canonical(first, True) == canonical([(2, 1, "x"), (1, 2, "y")], True)
    assert canonical(first, True) != canonical(swapped, True)
    assert canonical([(1,) * 12], False) == canonical([(1.0,) * 12], False)  # many identical columns stay cheap

