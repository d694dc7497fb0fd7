"""Execution-guided voting (scripts/voting.py) on hand-made candidates against a small SQLite database the test writes.

Covered: the majority result wins; failing candidates are dropped; a tie goes to the greedy answer's group, then to
the group met first; the greedy answer stands when nothing runs; row order counts only with ORDER BY; a candidate
that writes is a failure and the file is unchanged; and the fingerprint's equality is the EX metric's (every pair
of a set of queries, against `score_example` with one of them as gold).
Then an EX stage with scripted answers, and main.main with voting on: every candidate and vote stored, the report,
reruns, voting off, resume after an interrupted sampling, and two evaluation sets of one's own (each set voted on,
the best adapter chosen on the first set's voted EX).
"""
import hashlib
import json
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


def test_empty_results_vote_only_when_no_answer_has_a_non_empty_one(db):
    nobody = ["SELECT name FROM singer WHERE age > 100", "SELECT name FROM singer WHERE country = 'Mars'"]
    result = vote(OLDER, nobody * 2, db)  # four empty results against one non-empty greedy answer
    assert result.sql == OLDER and not result.changed and (result.votes, result.voters) == (1, 1)
    assert all(o.empty and o.fingerprint is not None for o in result.candidates)
    result = vote(nobody[0], [FRENCH] + nobody, db)  # an empty greedy answer gives way to a non-empty one
    assert result.sql == FRENCH and result.changed and result.greedy.empty
    result = vote(nobody[0], nobody + ["SELEC 1"], db)  # nothing non-empty ran: the empty results vote
    assert result.sql == nobody[0] and (result.votes, result.voters) == (3, 3)


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


def test_best_adapter_is_chosen_on_greedy_ex_unless_the_setting_says_voted():
    from types import SimpleNamespace

    from scripts.evaluate import best_adapter

    first, other = SimpleNamespace(name="first"), SimpleNamespace(name="other")
    tuned = {"a": {"first": {"adapter": "a/adapter", "ex": 0.5, "voted": {"ex": 0.4}},
                   "other": {"adapter": "a/adapter", "ex": 0.1, "voted": {"ex": 0.9}}},
             "b": {"first": {"adapter": "b/adapter", "ex": 0.4, "voted": {"ex": 0.6}},
                   "other": {"adapter": "b/adapter", "ex": 0.9, "voted": {"ex": 0.1}}}}
    assert best_adapter(tuned, [first, other]) == best_adapter(tuned, [first, other], "greedy") == "a/adapter"
    assert best_adapter(tuned, [first, other], "voted") == "b/adapter"  # always on the first evaluation set
    assert best_adapter(tuned, [other, first], "greedy") == "b/adapter"
    assert best_adapter(tuned, [other, first], "voted") == "a/adapter"


# ------------------------------------------------------------------ the EX stage with voting

@pytest.fixture(scope="module")
def demo_layout(tmp_path_factory):
    """The demo's Spider data, unpacked, and its dev examples."""
    from scripts.demo_data import build_demo_data
    from scripts.spider_release import load_split, prepare_spider

    root = tmp_path_factory.mktemp("demo")
    spider_zip, _ = build_demo_data(root / "build")
    layout = prepare_spider(spider_zip, root / "unpacked")
    return layout, load_split(layout, "dev")


WRONG = "SELECT 'not the answer'"
# what the model "says" for each kind of example: (greedy answer, 3 sampled answers); GOLD is the example's gold query
KINDS = [
    ("gained", WRONG, ["```sql\nGOLD\n```", "Here it is: GOLD;", "SELECT FROM author"]),  # the gold result wins 2 to 1
    ("failed", WRONG, ["SELECT FROM author", "SELECT * FROM nowhere", "no SQL at all"]),  # none runs: greedy stands
    ("kept", "GOLD", [WRONG, "GOLD", WRONG]),  # 2 to 2: the greedy answer's group
    ("lost", "GOLD", [WRONG, WRONG, "SELECT * FROM nowhere"]),  # the wrong result wins 2 to 1
]
KIND_OF = ["gained", "gained", "failed", "kept", "lost", "gained"]


def scripted_generate(examples, log):
    """A stand-in for scripts.generation.generate that answers from KINDS (greedy, or 3 samples per prompt)."""
    kinds = {name: (greedy, samples) for name, greedy, samples in KINDS}

    def generate(model, tokenizer, prompts, *, done=None, skip=(), sampling=None, batch_size=16, **kwargs):
        todo = [i for i in range(len(prompts)) if i not in set(skip)]
        out = [None] * len(prompts)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            answers = []
            for i in batch:
                greedy, samples = kinds[KIND_OF[i]]
                gold = examples[i]["query"]
                answers.append([s.replace("GOLD", gold) for s in samples][:sampling.n] if sampling else
                               greedy.replace("GOLD", gold))
                out[i] = answers[-1]
            log.append(("sampled" if sampling else "greedy", batch))
            done(batch, answers, 0.5)
        return out

    return generate


def test_ex_stage_votes_scores_and_stores_every_candidate(demo_layout, tmp_path, monkeypatch):
    import scripts.answers
    from scripts.evaluate import evaluate_text_to_sql
    from scripts.voting import sampling_config
    from scripts.generation import Sampling
    from scripts.store import ResultsStore
    from tests.tiny_models import build_tokenizer

    layout, dev = demo_layout
    examples = dev[:len(KIND_OF)]
    calls = []
    monkeypatch.setattr(scripts.answers, "generate", scripted_generate(examples, calls))
    sampling = Sampling(n=3, temperature=0.7, top_p=0.95, seed=0)
    with ResultsStore(tmp_path / "results.sqlite") as store:
        run_id = store.start_run("baseline_ex", "m", None, {}, "fp")
        summary = evaluate_text_to_sql(None, build_tokenizer(), examples, layout, store=store, run_id=run_id,
                                       batch_size=4, sampling=sampling)
        candidates = store.candidate_rows(run_id, sampling_config(sampling))
        votes = store.vote_rows(run_id, sampling_config(sampling))
        greedy_rows = store.sql_rows(run_id)
    assert [kind for kind, _ in calls] == ["greedy", "greedy", "sampled", "sampled"]
    assert summary["ex"] == pytest.approx(2 / 6)  # greedy right on "kept" and "lost"
    voted = summary["voted"]
    assert voted["ex"] == pytest.approx(4 / 6) and voted["count"] == 6  # "gained" x 3 and "kept"
    assert (voted["changed"], voted["gained"], voted["lost"]) == (4, 3, 1)
    assert (voted["n"], voted["temperature"], voted["top_p"], voted["seed"]) == (3, 0.7, 0.95, 0)
    assert voted["seconds"] >= 2 * 0.5  # the two sampled batches' generation time, as stored, plus the voting
    assert voted["errors"] == {"ok": 4, "wrong_result": 2}
    assert [r["correct"] for r in greedy_rows] == [False, False, False, True, True, False]  # greedy rows as before

    # the store: every candidate with its extracted SQL, fingerprint or error class; one vote per example
    assert len(candidates) == 6 * 3
    by_example = {}
    for row in candidates:
        by_example.setdefault(row["example_key"], []).append(row)
    for i, (example, kind) in enumerate(zip(examples, KIND_OF)):
        rows = sorted(by_example[f"{example['db_id']}::{example['question']}"], key=lambda r: r["candidate_index"])
        assert [r["candidate_index"] for r in rows] == [0, 1, 2]
        per_candidate = 0.5 / (4 if i < 4 else 2) / 3  # a batch's seconds shared by its prompts and their samples
        assert all(r["raw_output"] and r["latency_s"] == pytest.approx(per_candidate) for r in rows)
        assert all((r["fingerprint"] is not None) == (r["error"] == "ok") for r in rows)
        if kind == "gained":
            assert rows[0]["extracted_sql"] == rows[1]["extracted_sql"] == example["query"]
            assert rows[0]["fingerprint"] == rows[1]["fingerprint"] and rows[2]["error"] == "syntax_error"
        if kind == "failed":
            assert [r["error"] for r in rows] == ["syntax_error", "unknown_table_or_column", "empty"]
    assert [(v["changed"], v["correct"]) for v in votes] == [(True, True), (True, True), (False, False),
                                                              (False, True), (True, False), (True, True)]
    assert [v["voted_sql"] for v in votes][2:5] == [WRONG, examples[3]["query"], WRONG]
    assert [(v["votes"], v["voters"]) for v in votes][:5] == [(2, 3), (2, 3), (1, 1), (2, 4), (2, 3)]


# ------------------------------------------------------------------ main() with a tiny model

N_CANDIDATES = 3
VOTING_STAGES = "data,baseline_ex,preprocess,train,eval_adapters,report"  # MMLU left out: voting does not touch it
VOTING_FLAGS = ("--num-candidates", str(N_CANDIDATES), "--stages", VOTING_STAGES)


SCRIPTED = ("SELECT 1", "SELECT 1.0")  # one result, two texts


class Sampled:
    """Counts the prompts the EX stages sample candidates for (and may interrupt after the first sampled batch).

    The random tiny model never writes SQL, so candidates 0 and 1 of each question are replaced by SCRIPTED, which
    runs on every database: each question then has fingerprints, and a vote (2 to 0) that changes its answer.
    """

    def __init__(self, monkeypatch, interrupt: bool = False) -> None:
        import scripts.answers

        self.prompts, self.greedy, self.interrupt = 0, 0, interrupt
        real = scripts.answers.generate

        def generate(model, tokenizer, prompts, *, done=None, sampling=None, **kwargs):
            def counted(indices, answers, seconds):
                if sampling:
                    assert all(len(a) == sampling.n for a in answers)
                    answers = [[*SCRIPTED, *a[len(SCRIPTED):]] for a in answers]
                    self.prompts += len(indices)
                else:
                    self.greedy += len(indices)
                done(indices, answers, seconds)
                if sampling and self.interrupt:
                    self.interrupt = False
                    raise KeyboardInterrupt

            return real(model, tokenizer, prompts, done=counted, sampling=sampling, **kwargs)

        monkeypatch.setattr(scripts.answers, "generate", generate)


def voting_main(root, inputs, monkeypatch, *extra: str, interrupt: bool = False):
    """main.main with voting on (tests/test_pipeline.py's command, one training config); (status, counter)."""
    from tests.test_pipeline import TRAINING_CONFIGS, run_main

    with monkeypatch.context() as m:
        sampled = Sampled(m, interrupt)
        status, _ = run_main(root, inputs, m, "--training-configs", json.dumps(TRAINING_CONFIGS[:1]), *VOTING_FLAGS,
                             *extra)
    return status, sampled


def candidates_of(root, kind: str) -> dict:
    """(example_key, candidate_index) -> stored candidate row, for one EX run of the store."""
    conn = sqlite3.connect(root / "store" / "results.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT c.* FROM sql_candidates c JOIN runs r ON r.id = c.run_id WHERE r.kind = ?",
                            (kind,)).fetchall()
    finally:
        conn.close()
    return {(r["example_key"], r["candidate_index"]): dict(r) for r in rows}


@pytest.fixture(scope="module")
def voting_run(tmp_path_factory):
    """One run with NUM_CANDIDATES=3 and the best adapter chosen on voted EX; what it wrote."""
    from scripts.demo_data import build_demo_data
    from tests.tiny_models import save_tiny_model

    inputs_root = tmp_path_factory.mktemp("inputs")
    spider_zip, mmlu_dir = build_demo_data(inputs_root / "demo")
    inputs = {"model": save_tiny_model(inputs_root / "model", kind="chatml"), "zip": spider_zip, "mmlu": mmlu_dir}
    root = tmp_path_factory.mktemp("voting")
    with pytest.MonkeyPatch.context() as monkeypatch:
        status, sampled = voting_main(root, inputs, monkeypatch, "--select-adapter-on", "voted")
    assert status == 0
    return {"root": root, "inputs": inputs, "sampled": sampled,
            "results": json.loads((root / "results" / "results.json").read_text()),
            "report": (root / "results" / "report.md").read_text()}


def test_pipeline_with_voting_stores_every_candidate_and_reports_voted_ex(voting_run):
    from tests.test_pipeline import N_EVAL

    root, results, report, sampled = (voting_run[k] for k in ("root", "results", "report", "sampled"))
    assert sampled.greedy == sampled.prompts == 2 * N_EVAL  # baseline and the adapter, greedy and sampled
    (name, run), = results["runs"].items()
    assert results["best_adapter"] == run["adapter_dir"] and results["settings"]["select_adapter_on"] == "voted"
    dump = store_tables(root)
    kinds = {r["id"]: r["kind"] for r in dump["runs"]}
    db = root / "data" / "spider_data" / "spider_data" / "database"
    for kind, ex in (("baseline_ex@spider_dev", results["baseline"]["ex"]), (f"ex_{name}@spider_dev", run["ex"])):
        voted = ex["voted"]
        assert (voted["n"], voted["temperature"], voted["top_p"], voted["seed"], voted["count"]) == (3, 0.7, 0.95, 0,
                                                                                                    N_EVAL)
        assert voted["seconds"] > 0 and voted["changed"] == N_EVAL  # SCRIPTED's result against a failing greedy
        candidates = [c for c in dump["sql_candidates"] if kinds[c["run_id"]] == kind]
        assert len(candidates) == N_EVAL * N_CANDIDATES
        assert {json.dumps(json.loads(c["sampling"]), sort_keys=True) for c in candidates} == {
            json.dumps({"n": 3, "temperature": 0.7, "top_p": 0.95, "seed": 0}, sort_keys=True)}
        assert all(c["raw_output"] is not None and c["error"] is not None and c["latency_s"] > 0 for c in candidates)
        assert all((c["fingerprint"] is not None) == (c["error"] == "ok") for c in candidates)
        assert len({(c["example_key"], c["candidate_index"]) for c in candidates}) == N_EVAL * N_CANDIDATES
        sampled = [c["raw_output"] for c in candidates if c["candidate_index"] >= len(SCRIPTED)]
        assert len(set(sampled)) > 1  # the model's own samples differ
        assert {c["fingerprint"] for c in candidates if c["candidate_index"] < len(SCRIPTED)} == {
            run_candidate("SELECT 1", next(db.glob("*/*.sqlite"))).fingerprint}
        votes = [v for v in dump["sql_votes"] if kinds[v["run_id"]] == kind]
        assert len(votes) == N_EVAL and sum(v["changed"] for v in votes) == voted["changed"]
        assert all(v["voted_sql"] == "SELECT 1" and (v["votes"], v["voters"]) == (2, 2) for v in votes)
        assert sum(v["correct"] for v in votes) / N_EVAL == voted["ex"]
        greedy = [r for r in dump["sql_results"] if kinds[r["run_id"]] == kind]
        assert len(greedy) == N_EVAL and sum(r["correct"] for r in greedy) / N_EVAL == ex["ex"]
    # the report: greedy and voted EX side by side for the baseline and the adapter, and the voting cost
    assert "| run | EX % | voted EX % | easy % |" in report and "## Execution-guided voting" in report
    base = results["baseline"]["ex"]
    assert f"| baseline | {100 * base['ex']:.1f} | {100 * base['voted']['ex']:.1f} |" in report
    assert f"| {name} (best) | {100 * run['ex']['ex']:.1f} | {100 * run['ex']['voted']['ex']:.1f} |" in report
    assert f"{base['voted']['seconds']:.1f} |" in report and "chosen on voted EX" in report


def store_tables(root) -> dict:
    """Every row of the store's tables, by table."""
    conn = sqlite3.connect(root / "store" / "results.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return {t: [dict(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY rowid")]
                for t in ("runs", "sql_results", "sql_candidates", "sql_votes")}
    finally:
        conn.close()


def test_rerun_reuses_the_votes_and_voting_off_reuses_the_greedy_answers(voting_run, monkeypatch):
    root, inputs, results = voting_run["root"], voting_run["inputs"], voting_run["results"]
    before = store_tables(root)
    status, sampled = voting_main(root, inputs, monkeypatch, "--select-adapter-on", "voted")
    assert status == 0 and sampled.prompts == sampled.greedy == 0
    assert store_tables(root) == before
    # voting off: the same run in the store, so no greedy answer is generated again; no voted result
    status, sampled = voting_main(root, inputs, monkeypatch, "--num-candidates", "0", "--stages", "data,baseline_ex")
    assert status == 0 and sampled.prompts == sampled.greedy == 0
    off = json.loads((root / "results" / "stages" / "baseline_ex@spider_dev.json").read_text())["result"]
    assert "voted" not in off
    on = results["baseline"]["ex"]
    assert {k: off[k] for k in ("ex", "count", "by_hardness", "errors", "run_id")} == {
        k: on[k] for k in ("ex", "count", "by_hardness", "errors", "run_id")}


def test_interrupted_sampling_resumes_without_regenerating_stored_candidates(voting_run, tmp_path, monkeypatch):
    from tests.test_pipeline import BATCH, N_EVAL

    inputs, full = voting_run["inputs"], voting_run["root"]
    stages = ("--stages", "data,baseline_ex")
    status, sampled = voting_main(tmp_path, inputs, monkeypatch, *stages, interrupt=True)
    assert status == 130 and sampled.greedy == N_EVAL and sampled.prompts == BATCH
    stored = candidates_of(tmp_path, "baseline_ex@spider_dev")
    assert len(stored) == BATCH * N_CANDIDATES  # the first batch's candidates, generated but not executed yet
    assert all(c["raw_output"] is not None and c["fingerprint"] is None and c["error"] is None for c in stored.values())
    assert not store_tables(tmp_path)["sql_votes"]

    status, sampled = voting_main(tmp_path, inputs, monkeypatch, *stages)
    assert status == 0 and sampled.greedy == 0 and sampled.prompts == N_EVAL - BATCH  # only what was missing
    kind = "baseline_ex@spider_dev"
    resumed, uninterrupted = candidates_of(tmp_path, kind), candidates_of(full, kind)
    assert {k: c["raw_output"] for k, c in resumed.items() if k in stored} == {
        k: c["raw_output"] for k, c in stored.items()}  # kept, not regenerated
    volatile = ("run_id", "updated_at", "latency_s")
    assert ({k: {f: v for f, v in c.items() if f not in volatile} for k, c in resumed.items()}
            == {k: {f: v for f, v in c.items() if f not in volatile} for k, c in uninterrupted.items()})  # same seeds
    result = json.loads((tmp_path / "results" / "stages" / "baseline_ex@spider_dev.json").read_text())["result"]
    expected = voting_run["results"]["baseline"]["ex"]
    assert {k: v for k, v in result["voted"].items() if k != "seconds"} == {
        k: v for k, v in expected["voted"].items() if k != "seconds"}


# ------------------------------------------------------------------ voting on every evaluation set (your own data)

def test_voting_on_every_evaluation_set_best_adapter_on_the_first_sets_voted_ex(tmp_path, monkeypatch):
    """Two evaluation sets of one's own (tests/test_own_data.py's files and databases, no Spider), voting on: each set's
    EX result, the baseline's and each adapter's, has its own `voted`; candidates and votes are stored per run (so per
    set); the best adapter is the one with the highest voted EX on the first set; the report shows both per set."""
    from tests import test_own_data as own
    from tests.tiny_models import save_tiny_model

    mine = tmp_path / "mine"
    dbs = own.make_databases(mine / "dbs")
    train = own.write_jsonl(mine / "train.jsonl", own.TRAIN)
    sets = ["--eval-dataset", f"{own.write_json(mine / 'my_eval.json', own.EVAL)},"
            f"{own.write_jsonl(mine / 'holdout.jsonl', own.HOLDOUT)}", "--databases", str(dbs)]
    model = save_tiny_model(tmp_path / "model", kind="chatml")
    sampled = Sampled(monkeypatch)  # candidates 0 and 1 become SCRIPTED: every vote goes to `SELECT 1`
    status, _ = own.run_main(tmp_path, monkeypatch, model, *sets, "--ft-dataset", str(train),
                             "--training-configs", json.dumps(own.TRAINING_CONFIGS), "--num-candidates", "2",
                             "--select-adapter-on", "voted",
                             "--stages", "baseline_ex,preprocess,train,eval_adapters,report")
    assert status == 0
    sizes = {"my_eval": own.USABLE_EVAL, "holdout": len(own.HOLDOUT)}
    assert sampled.prompts == sampled.greedy == 3 * sum(sizes.values())  # the baseline and two adapters, each set
    out = tmp_path / "results"
    results = json.loads((out / "results.json").read_text())
    by_run = {"baseline": results["baseline"]["ex_by_set"], **{n: r["ex_by_set"] for n, r in results["runs"].items()}}
    conn = sqlite3.connect(out / "results.sqlite")
    try:
        stored = dict(conn.execute("SELECT r.kind, COUNT(*) FROM sql_candidates c JOIN runs r ON r.id = c.run_id "
                                   "GROUP BY r.id").fetchall())
        votes = dict(conn.execute("SELECT r.kind, COUNT(*) FROM sql_votes v JOIN runs r ON r.id = v.run_id "
                                  "GROUP BY r.id").fetchall())
    finally:
        conn.close()
    for name, by_set in by_run.items():
        assert set(by_set) == set(sizes)
        for set_name, n in sizes.items():
            ex, kind = by_set[set_name], f"{'baseline_ex' if name == 'baseline' else 'ex_' + name}@{set_name}"
            assert ex["voted"]["count"] == n and ex["voted"]["n"] == 2 and ex["voted"]["changed"] == n
            assert stored[kind] == 2 * n and votes[kind] == n
            saved = json.loads((out / "stages" / f"{kind}.json").read_text())["result"]
            assert saved["voted"] == ex["voted"]
    firsts = {r["adapter_dir"]: r["ex_by_set"]["my_eval"]["voted"]["ex"] for r in results["runs"].values()}
    assert results["best_adapter"] == max(firsts, key=firsts.get)  # the first set's voted EX (the first on a tie)
    assert all(r["ex"] == r["ex_by_set"]["my_eval"] for r in results["runs"].values())
    report = (out / "report.md").read_text()
    assert "| run | EX % | voted EX % | easy % |" in report
    assert "| run | `my_eval` EX % (n) | `my_eval` voted EX % | `holdout` EX % (n) | `holdout` voted EX % |" in report
    base = by_run["baseline"]
    assert (f"| baseline | {100 * base['my_eval']['ex']:.1f} ({sizes['my_eval']}) | "
            f"{100 * base['my_eval']['voted']['ex']:.1f} | {100 * base['holdout']['ex']:.1f} ({sizes['holdout']}) | "
            f"{100 * base['holdout']['voted']['ex']:.1f} |") in report
    for set_name in sizes:
        assert f"| baseline, `{set_name}` | {100 * base[set_name]['ex']:.1f} | " in report  # the voting section
    assert "chosen on voted EX of `my_eval`" in report
