"""`python -m scripts.ask` on a tiny export and the demo's library database: the training prompt, the SQL and its
rows (text and --json, greedy and voted), a questions file, every bad input's one line and exit status 2, and a
database left byte for byte as it was, whatever the model answers."""
import json
import sqlite3

import pytest

import scripts.generation
import scripts.models
from scripts import ask
from scripts.answers import build_prompts
from scripts.databases import databases_layout
from scripts.demo_data import build_demo_data
from tests.tiny_export import export_tiny_run

QUESTION = "How many books are there?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny run's export and the demo's databases (shared, read-only)."""
    root = tmp_path_factory.mktemp("ask")
    _, _, export = export_tiny_run(root)
    build_demo_data(root / "demo")
    databases = root / "demo" / "spider_data" / "database"
    return {"export": export, "databases": databases, "db": databases / "library" / "library.sqlite"}


def answering(monkeypatch, *texts: str) -> list:
    """The model's greedy answers replaced by `texts` (in turn); the prompts it was given, recorded."""
    prompts = []

    def generate(model, tokenizer, batch, **kwargs):
        prompts.extend(batch)
        return [texts[(len(prompts) - len(batch) + i) % len(texts)] for i in range(len(batch))]

    monkeypatch.setattr(scripts.generation, "generate", generate)
    return prompts


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one command."""
    status = ask.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_ask_prints_the_sql_and_the_first_rows_of_its_result(setup, monkeypatch, capsys):
    prompts = answering(monkeypatch, "```sql\nSELECT title, pages FROM book ORDER BY pages DESC;\n```")
    status, out, _ = run(capsys, QUESTION, "--db", setup["db"], "--model", setup["export"], "--max-rows", "2")
    con = sqlite3.connect(setup["db"])
    rows = con.execute("SELECT title, pages FROM book ORDER BY pages DESC").fetchall()
    con.close()
    assert status == 0
    lines = out.splitlines()
    assert lines[:2] == [f"Q: {QUESTION}", "SQL: SELECT title, pages FROM book ORDER BY pages DESC"]
    assert lines[2].split() == ["title", "|", "pages"] and set(lines[3]) <= {"-", "+"}
    assert [line.split(" | ") for line in lines[4:6]] == [[t.ljust(len(lines[4].split(" | ")[0])), str(p)]
                                                          for t, p in rows[:2]]
    assert lines[6] == f"{len(rows)} rows, the first 2 shown"

    # the prompt is the evaluation's (and so the training's): the database's own schema, the question
    from scripts.models import load_tokenizer

    tokenizer = load_tokenizer(str(setup["export"]))
    layout = databases_layout(setup["databases"])
    assert prompts == build_prompts(tokenizer, [{"db_id": "library", "question": QUESTION}], layout)


def test_json_gives_each_answer_a_line_and_a_questions_file_asks_each_line(setup, monkeypatch, capsys, tmp_path):
    answering(monkeypatch, "SELECT count(*) FROM book", "I do not know.")
    questions = tmp_path / "questions.txt"
    questions.write_text(f"{QUESTION}\n\n  Which books are long?  \n")
    status, out, _ = run(capsys, "--questions", questions, "--db", setup["db"], "--model", setup["export"], "--json")
    first, second = (json.loads(line) for line in out.splitlines())
    assert status == 1  # the second answer holds no SQL
    assert first["question"] == QUESTION and first["sql"] == "SELECT count(*) FROM book" and first["ok"] is True
    assert first["columns"] == ["count(*)"] and first["rows"] == [[20]] and first["row_count"] == 1
    assert first["truncated"] is False and first["voting"] is None
    assert second["question"] == "Which books are long?" and second["ok"] is False and second["error"] == "no_sql"
    assert second["raw_output"] == "I do not know."


def test_the_tiny_model_answers_greedily_and_with_voting(setup, capsys):
    status, out, err = run(capsys, QUESTION, "--db", setup["db"], "--model", setup["export"])
    assert status in (0, 1) and out.startswith(f"Q: {QUESTION}\nSQL: ") and "Traceback" not in err
    status, out, _ = run(capsys, QUESTION, "--db", setup["db"], "--model", setup["export"], "--json",
                         "--num-candidates", "3")
    answer = json.loads(out)
    assert status in (0, 1) and answer["voting"]["candidates"] == 3 and answer["sql"] == answer["voting"]["sql"]


@pytest.mark.parametrize("case, message", [
    ("no export", "no exported model at {root}/results/export: run `python main.py` (every stage, export last), or "
                  "`python main.py --stages export`"),
    ("not a model", "--model {root} holds no model (no config.json): run `python main.py`"),
    ("not sqlite", "--db {root}/notes.txt is not an SQLite database (no SQLite header"),
    ("no database", "--db {root}/missing.sqlite: no such file"),
    ("empty question", "the question is empty"),
    ("no questions file", "--questions {root}/missing.txt: not found"),
    ("blank questions file", "--questions {root}/blank.txt holds no question"),
    ("no question", "no question: give one"),
])
def test_bad_input_is_one_line_and_exit_status_2(setup, monkeypatch, capsys, tmp_path, case, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RESULTS_DIR", raising=False)
    monkeypatch.setattr(scripts.models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "notes.txt").write_text("not a database")
    (tmp_path / "blank.txt").write_text("\n  \n")
    args = {"no export": [QUESTION, "--db", setup["db"]],
            "not a model": [QUESTION, "--db", setup["db"], "--model", tmp_path],
            "not sqlite": [QUESTION, "--db", tmp_path / "notes.txt"],
            "no database": [QUESTION, "--db", tmp_path / "missing.sqlite"],
            "empty question": ["  ", "--db", setup["db"]],
            "no questions file": ["--questions", tmp_path / "missing.txt", "--db", setup["db"]],
            "blank questions file": ["--questions", tmp_path / "blank.txt", "--db", setup["db"]],
            "no question": ["--db", setup["db"]]}[case]
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    status, out, err = run(capsys, *args)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and message.format(root=tmp_path) in err, err


@pytest.mark.parametrize("answer", ["DELETE FROM book", "DROP TABLE book", "WITH x AS (SELECT 1) DELETE FROM book",
                                    "SELECT 1; DROP TABLE book", "UPDATE book SET pages = 0",
                                    "WITH x AS (SELECT 1) INSERT INTO book (title) SELECT 'x' FROM x"])
def test_the_database_is_never_changed(setup, monkeypatch, capsys, answer):
    db = setup["db"]
    before, files = db.read_bytes(), sorted(p.name for p in db.parent.iterdir())
    answering(monkeypatch, answer)
    status, out, _ = run(capsys, QUESTION, "--db", db, "--model", setup["export"], "--json")
    result = json.loads(out)
    assert db.read_bytes() == before and sorted(p.name for p in db.parent.iterdir()) == files
    if result["sql"].startswith("SELECT 1"):  # the statement before the `;` alone is taken
        assert status == 0 and result["rows"] == [[1]]
    else:
        assert status == 1 and result["error"] in ("no_sql", "not_read_only"), result
