"""Bring your own data: the user's train set, evaluation sets and databases, with every input checked.

Unit: the two file formats (JSON list, JSON lines; extra fields dropped), both database layouts, a message naming
the file for each bad input, examples left out and reported (no database, failing gold query, repeated question),
fingerprints that follow the content of the files and not their paths.
End to end through main.main, with no Spider at all: a tiny model, databases written here, a train set and two
evaluation sets; `--stages baseline_ex` with hostile model output (the databases stay byte for byte as they were),
then training and evaluation of the adapters on both sets, then reruns that redo only what changed content.
"""
import json
import logging
import shutil
import sqlite3
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import main
import scripts.answers
import scripts.evaluate
from custom_metrics.execution_accuracy import execution_accuracy
from scripts.databases import databases_layout, schema_text
from scripts.errors import UserError
from scripts.settings import ENV_KEYS
from scripts.spider_data import (
    EVAL_SETTING,
    TRAIN_SETTING,
    load_user_set,
    prepare_stage,
    set_fingerprint,
)
from tests.tiny_models import save_tiny_model

TRAIN = [  # JSON lines, with a field the pipeline ignores
    {"question": "How many pets are there?", "query": "SELECT count(*) FROM pets", "db_id": "pets", "level": 1},
    {"question": "List the species of all pets.", "query": "SELECT species FROM pets", "db_id": "pets"},
    {"question": "Which owners live in Oslo?", "query": "SELECT name FROM owners WHERE city = 'Oslo'", "db_id": "pets"},
    {"question": "What is the average pet age?", "query": "SELECT avg(age) FROM pets", "db_id": "pets"},
    {"question": "Name the owners of cats.", "query": "SELECT o.name FROM owners AS o JOIN pets AS p ON "
     "o.id = p.owner_id WHERE p.species = 'cat'", "db_id": "pets"},
    {"question": "How many items are there?", "query": "SELECT count(*) FROM items", "db_id": "shop"},
    {"question": "What is the most expensive item?", "query": "SELECT name FROM items ORDER BY price DESC LIMIT 1",
     "db_id": "shop"},
    {"question": "List the items under 5.", "query": "SELECT name FROM items WHERE price < 5", "db_id": "shop"},
    {"question": "Which column fails?", "query": "SELECT colour FROM pets", "db_id": "pets"},  # gold fails: left out
    {"question": "How many planets?", "query": "SELECT count(*) FROM planets", "db_id": "space"},  # no database
]
USABLE_TRAIN = 8
EVAL = [  # a JSON list
    {"question": "How many owners are there?", "query": "SELECT count(*) FROM owners", "db_id": "pets"},
    {"question": "List the dogs' ages.", "query": "SELECT age FROM pets WHERE species = 'dog'", "db_id": "pets"},
    {"question": "Who owns the oldest pet?", "query": "SELECT o.name FROM owners AS o JOIN pets AS p ON "
     "o.id = p.owner_id ORDER BY p.age DESC LIMIT 1", "db_id": "pets"},
    {"question": "What is the cheapest item?", "query": "SELECT name FROM items ORDER BY price LIMIT 1", "db_id": "shop"},
    {"question": "How many items cost more than 3?", "query": "SELECT count(*) FROM items WHERE price > 3",
     "db_id": "shop"},
    {"question": "How many owners are there?", "query": "SELECT count(id) FROM owners", "db_id": "pets"},  # repeated
    {"question": "How many moons?", "query": "SELECT count(*) FROM moons", "db_id": "space"},  # no database
]
USABLE_EVAL = 5
HOLDOUT = [  # JSON lines
    {"question": "Which cities do owners live in?", "query": "SELECT DISTINCT city FROM owners", "db_id": "pets"},
    {"question": "List every item name.", "query": "SELECT name FROM items", "db_id": "shop"},
    {"question": "How many cats are there?", "query": "SELECT count(*) FROM pets WHERE species = 'cat'", "db_id": "pets"},
]
TRAINING_CONFIGS = [
    {"learning_rate": 1e-2, "max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
     "max_length": 1024, "gradient_checkpointing": False, "logging_steps": 1},
    {"learning_rate": 5e-3, "max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
     "max_length": 1024, "gradient_checkpointing": False, "logging_steps": 1},
]
HOSTILE = ["DELETE FROM pets", "DROP TABLE owners", "UPDATE items SET price = 0",
           "ATTACH DATABASE 'stolen.sqlite' AS s", "CREATE TABLE t (x)", "PRAGMA journal_mode = WAL"]


def make_databases(folder: Path) -> Path:
    """pets.sqlite (one file, in WAL mode) and shop/shop.sqlite (Spider's folder layout)."""
    (folder / "shop").mkdir(parents=True)
    conn = sqlite3.connect(folder / "pets.sqlite")
    conn.execute("PRAGMA journal_mode = WAL")  # a WAL database read by a careless reader leaves -wal/-shm files
    conn.executescript("""
        CREATE TABLE owners (id INTEGER PRIMARY KEY, name TEXT, city TEXT);
        CREATE TABLE pets (id INTEGER PRIMARY KEY, owner_id INTEGER REFERENCES owners(id), species TEXT, age INTEGER);
        INSERT INTO owners VALUES (1, 'Ann', 'Oslo'), (2, 'Bo', 'Rome'), (3, 'Cy', 'Oslo');
        INSERT INTO pets VALUES (1, 1, 'cat', 3), (2, 2, 'dog', 7), (3, 3, 'dog', 2), (4, 1, 'cat', 11);
    """)
    conn.commit()
    conn.close()
    conn = sqlite3.connect(folder / "shop" / "shop.sqlite")
    conn.executescript("""
        CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL);
        INSERT INTO items VALUES (1, 'pen', 1.5), (2, 'book', 12.0), (3, 'cup', 4.0);
    """)
    conn.commit()
    conn.close()
    return folder


def write_json(path: Path, examples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(examples, indent=1))
    return path


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def snapshot(folder: Path) -> dict:
    """Every file under folder with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def data(tmp_path) -> SimpleNamespace:
    """The user's databases and files, in tmp_path/mine."""
    mine = tmp_path / "mine"
    return SimpleNamespace(dbs=make_databases(mine / "dbs"), train=write_jsonl(mine / "train.jsonl", TRAIN),
                           eval=write_json(mine / "my_eval.json", EVAL), holdout=write_jsonl(mine / "holdout.jsonl", HOLDOUT))


# --- unit: formats, messages, examples left out ------------------------------------------------------------

def test_json_list_and_json_lines_both_load_extra_fields_dropped_both_layouts(data, caplog):
    dbs = databases_layout(data.dbs)
    train = load_user_set(data.train, TRAIN_SETTING, dbs, 5.0)
    assert train.name == "train" and len(train.examples) == USABLE_TRAIN
    assert train.examples[0] == {k: TRAIN[0][k] for k in ("question", "query", "db_id")}  # "level" dropped
    assert {e["db_id"] for e in train.examples} == {"pets", "shop"}  # pets.sqlite and shop/shop.sqlite
    assert dbs.db_path("pets") == data.dbs / "pets.sqlite" and dbs.db_path("shop") == data.dbs / "shop" / "shop.sqlite"
    log = caplog.text
    assert f"{data.train}: 1 of 10 examples left out, their db_id has no database in {data.dbs}" in log
    assert "{'space': 1}" in log
    assert "1 of 10 examples left out, their gold query fails on its database: line 9 (pets)" in log
    assert "no such column: colour" in log

    evaluation = load_user_set(data.eval, EVAL_SETTING, dbs, 5.0, unique=True)
    assert [e["question"] for e in evaluation.examples] == [e["question"] for e in EVAL[:USABLE_EVAL]]
    assert "1 examples left out, the same db_id and question as an earlier one: entry 6 repeats entry 1" in caplog.text
    assert load_user_set(data.holdout, EVAL_SETTING, dbs, 5.0).examples == HOLDOUT


@pytest.mark.parametrize("content, message", [
    (None, "PATH_TASK_EVAL_DATASET (--eval-dataset): {path} not found; give a JSON list or JSON lines"),
    ('[{"question": "q", "query": "SELECT 1", "db_id": "pets"},\n oops]',
     "{path} is not valid JSON: Expecting value at line 2, column 2"),
    ('{"question": "q", "query": "SELECT 1", "db_id": "pets"}\n{"question": "q2", "query": \n',
     "{path} line 2 is not valid JSON"),
    ('{"question": "q", "query": "SELECT 1", "db_id": "pets"}\n\n{"question": "q2", "db_id": "pets"}\n',
     "{path}: line 3 lacks query"),
    ('[{"question": "q", "query": " ", "db_id": "pets"}]', "{path}: entry 1 lacks query"),
    ('[]', "{path} holds no examples"),
    ('{"a": 1}', "{path}: a JSON object, not a list of examples; it holds no list (keys: 'a')"),
    ('{"question": "q", "db_id": "pets"}', "{path}: line 1 lacks query"),  # JSON lines of one (incomplete) example
    (json.dumps({"version": 2, "data": EVAL}, indent=2),
     "{path}: a JSON object, not a list of examples; its key 'data' holds a list of 7: put that list at the top level"),
    (json.dumps({"train": TRAIN, "dev": EVAL}),
     "{path}: a JSON object, not a list of examples; its keys 'train' (10), 'dev' (7) hold lists"),
    (b'[{"question": "caf\xe9", "query": "SELECT 1", "db_id": "pets"}]', "{path} is not UTF-8 text"),
])
def test_each_bad_file_is_a_message_naming_it(data, tmp_path, content, message):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as error:
        load_user_set(path, EVAL_SETTING, databases_layout(data.dbs), 5.0)
    assert message.format(path=path) in str(error.value)


@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_a_utf8_byte_order_mark_is_accepted(data, tmp_path, writer):
    path = writer(tmp_path / "bom.json", EVAL[:USABLE_EVAL])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Windows editors save "UTF-8 with BOM"
    loaded = load_user_set(path, EVAL_SETTING, databases_layout(data.dbs), 5.0)
    assert loaded.examples == EVAL[:USABLE_EVAL]


@pytest.mark.parametrize("db_id", ["../outside", "shop/../../outside", "/abs/outside", "..", "a\\b"])
def test_a_db_id_that_is_not_a_plain_name_is_refused(data, tmp_path, db_id):
    shutil.copy(data.dbs / "pets.sqlite", data.dbs.parent / "outside.sqlite")  # what "../outside" would reach
    examples = [EVAL[0], dict(EVAL[1], db_id=db_id.replace("/abs", str(data.dbs.parent)))]
    for path, place in ((write_json(tmp_path / "e.json", examples), "entry 2"),
                        (write_jsonl(tmp_path / "e.jsonl", examples), "line 2")):
        with pytest.raises(UserError, match=f"{path}: {place} has db_id .*, not a plain name"):
            load_user_set(path, EVAL_SETTING, databases_layout(data.dbs), 5.0)


def test_bad_databases_are_messages_naming_the_file(data, tmp_path):
    with pytest.raises(UserError, match="no example of .* can be used .*2 without a database"):
        load_user_set(write_jsonl(tmp_path / "e.jsonl", [EVAL[-1], EVAL[-1]]), EVAL_SETTING,
                      databases_layout(data.dbs), 5.0)
    (data.dbs / "shop" / "shop.sqlite").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(UserError, match=r"shop\.sqlite \(database 'shop' of .*my_eval\.json\) is not an SQLite"):
        load_user_set(data.eval, EVAL_SETTING, databases_layout(data.dbs), 5.0)
    (data.dbs / "broken.sqlite").write_bytes((data.dbs / "pets.sqlite").read_bytes()[:100] + b"\xff" * 4000)
    with pytest.raises(UserError, match=r"broken\.sqlite \(database 'broken' of .*\) cannot be read as SQLite"):
        load_user_set(write_jsonl(tmp_path / "b.jsonl", [dict(EVAL[0], db_id="broken")]), EVAL_SETTING,
                      databases_layout(data.dbs), 5.0)


def test_a_database_without_tables_is_one_warning_naming_it_and_its_examples(data, tmp_path, caplog):
    empty = data.dbs / "empty.sqlite"
    conn = sqlite3.connect(empty)
    conn.execute("CREATE TABLE gone (x)")  # a valid SQLite file whose only table was dropped
    conn.execute("DROP TABLE gone")
    conn.commit()
    conn.close()
    blank = [{"question": f"Question {i}?", "query": "SELECT 1" if i % 2 else "SELECT count(*) FROM t",
              "db_id": "empty"} for i in range(4)]
    path = write_jsonl(tmp_path / "e.jsonl", blank + EVAL[:2])
    with caplog.at_level(logging.WARNING):
        loaded = load_user_set(path, EVAL_SETTING, databases_layout(data.dbs), 5.0)
    assert loaded.examples == EVAL[:2]  # even a gold that runs ("SELECT 1") has no schema to be asked about
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{path}: 4 of 6 examples left out, their database 'empty' ({empty}) has no tables, so there "
                        "is no schema to answer from; add its tables, or remove those examples"]
    with pytest.raises(UserError, match="no example of .* can be used .*, 2 on a database without tables"):
        load_user_set(write_jsonl(tmp_path / "only.jsonl", blank[:2]), EVAL_SETTING, databases_layout(data.dbs), 5.0)


def test_an_unreadable_database_is_a_message_saying_it_cannot_be_read(data, monkeypatch):
    target = data.dbs / "shop" / "shop.sqlite"
    real_open = Path.open

    def no_permission(self, *args, **kwargs):  # what chmod 000 does for anyone but root
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_permission)
    with pytest.raises(UserError) as error:
        load_user_set(data.eval, EVAL_SETTING, databases_layout(data.dbs), 5.0)
    assert str(error.value).startswith(f"{target} (database 'shop' of {data.eval}) cannot be read (Permission denied); "
                                       "give this user read permission on it")
    with pytest.raises(UserError, match=r"shop\.sqlite cannot be read \(Permission denied\)"):
        schema_text(target)


def test_changes_still_in_the_wal_are_read_scored_and_fingerprinted(data, tmp_path):
    pets = data.dbs / "pets.sqlite"  # in WAL mode (make_databases)
    writer = sqlite3.connect(pets, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint = 0")  # the committed changes stay in pets.sqlite-wal
    writer.execute("INSERT INTO pets VALUES (5, 2, 'fish', 1)")
    writer.execute("CREATE TABLE vets (id INTEGER PRIMARY KEY, name TEXT)")
    fish = {"question": "How many fish?", "query": "SELECT count(*) FROM pets WHERE species = 'fish'", "db_id": "pets"}
    try:
        assert (data.dbs / "pets.sqlite-wal").stat().st_size > 0
        before = snapshot(data.dbs)
        assert "CREATE TABLE vets" in schema_text(pets)
        summary = execution_accuracy(["SELECT 1"], [fish["query"]], ["pets"], data.dbs)  # 1 fish, not 0
        assert summary["per_example"][0]["correct"] is True
        fished = load_user_set(write_json(tmp_path / "fish.json", [fish]), EVAL_SETTING, databases_layout(data.dbs), 5.0)
        assert snapshot(data.dbs) == before  # the .sqlite, -wal and -shm as they were, and nothing new beside them
        first = set_fingerprint(fished.examples, fished.layout)
        writer.execute("INSERT INTO pets VALUES (6, 2, 'fish', 2)")  # only the -wal changes
        assert pets.read_bytes() == before["pets.sqlite"][0]
        assert set_fingerprint(fished.examples, fished.layout) != first
    finally:
        writer.close()


def run_settings(tmp_path, **overrides) -> SimpleNamespace:
    """The settings prepare_stage reads."""
    values = {"path_databases": None, "path_ft_dataset": None, "path_task_eval_dataset": (), "sql_timeout_s": 5.0,
              "stages": ("baseline_ex",), "spider_zip": tmp_path / "no_spider.zip", "data_dir": tmp_path / "unpacked"}
    return SimpleNamespace(**{**values, **overrides})


def test_spider_is_needed_only_for_what_comes_from_it(data, tmp_path):
    run = prepare_stage(run_settings(tmp_path, path_databases=data.dbs, path_task_eval_dataset=(data.eval,)))
    assert run.train is None and [d.name for d in run.eval_sets] == ["my_eval"]
    assert not (tmp_path / "unpacked").exists()
    # the preprocess stage takes Spider train when no train set is given: its absence is named, with both fixes
    with pytest.raises(UserError, match=r"the train set of the preprocess stage \(PATH_FT_DATASET .* is not set\)"
                                        r".*PATH_SPIDER_ZIP.*Bring your own data"):
        prepare_stage(run_settings(tmp_path, path_databases=data.dbs, path_task_eval_dataset=(data.eval,),
                                   stages=("baseline_ex", "preprocess")))
    with pytest.raises(UserError, match=r"the databases \(PATH_DATABASES .* is not set\)"):
        prepare_stage(run_settings(tmp_path, path_task_eval_dataset=(data.eval,), path_ft_dataset=data.train))
    with pytest.raises(UserError, match=r"PATH_DATABASES \(--databases\): .*nowhere not found"):
        prepare_stage(run_settings(tmp_path, path_databases=tmp_path / "nowhere", path_task_eval_dataset=(data.eval,)))
    twin = write_json(tmp_path / "other" / "my_eval.json", EVAL)
    with pytest.raises(UserError, match="would both be reported as 'my_eval'"):
        prepare_stage(run_settings(tmp_path, path_databases=data.dbs, path_task_eval_dataset=(data.eval, twin)))


def test_own_eval_set_with_spider_train_and_databases(data, tmp_path):
    """Only an evaluation set given: Spider still gives the train set and (by default) the databases."""
    spider = tmp_path / "spider"
    (spider / "database").mkdir(parents=True)
    shutil.copytree(data.dbs / "shop", spider / "database" / "shop")
    write_json(spider / "train_spider.json", TRAIN[5:8])
    write_json(spider / "dev.json", TRAIN[5:6])
    write_json(spider / "tables.json", [{"db_id": "shop"}])
    shop_eval = write_json(tmp_path / "shop_eval.json", EVAL[3:5])
    run = prepare_stage(run_settings(tmp_path, spider_zip=spider, path_task_eval_dataset=(shop_eval,),
                                     stages=("baseline_ex", "preprocess")))
    assert run.train.name == "spider_train" and len(run.train.examples) == 3
    assert [d.name for d in run.eval_sets] == ["shop_eval"] and run.eval_sets[0].examples == EVAL[3:5]
    assert run.eval_sets[0].layout.database_dir == spider / "database"
    assert run.eval_sets[0].layout.tables_file is None  # tables.json describes Spider's sets, not the user's


def test_fingerprints_follow_content_not_paths(data, tmp_path):
    dbs = databases_layout(data.dbs)
    first = load_user_set(data.eval, EVAL_SETTING, dbs, 5.0).fingerprint
    moved_dbs = tmp_path / "moved"
    shutil.copytree(data.dbs, moved_dbs)
    copy = write_json(tmp_path / "elsewhere" / "my_eval.json", EVAL)
    assert load_user_set(copy, EVAL_SETTING, databases_layout(moved_dbs), 5.0).fingerprint == first
    changed = [dict(EVAL[0], query="SELECT count(name) FROM owners")] + EVAL[1:]
    assert load_user_set(write_json(copy, changed), EVAL_SETTING, dbs, 5.0).fingerprint != first
    conn = sqlite3.connect(moved_dbs / "shop" / "shop.sqlite")
    conn.execute("INSERT INTO items VALUES (4, 'ink', 2.0)")
    conn.commit()
    conn.close()
    examples = load_user_set(data.eval, EVAL_SETTING, dbs, 5.0).examples
    assert set_fingerprint(examples, databases_layout(moved_dbs)) != first  # the same examples, another database


def test_best_adapter_is_chosen_on_the_first_evaluation_set():
    sets = [SimpleNamespace(name="first"), SimpleNamespace(name="second")]
    tuned = {"a": {"first": {"ex": 0.5, "adapter": "A"}, "second": {"ex": 0.9, "adapter": "A"}},
             "b": {"first": {"ex": 0.6, "adapter": "B"}, "second": {"ex": 0.1, "adapter": "B"}},
             "c": {"first": {"ex": 0.6, "adapter": "C"}, "second": {"ex": 0.2, "adapter": "C"}}}
    assert scripts.evaluate.best_adapter(tuned, sets) == "B"  # the first on a tie
    assert scripts.evaluate.best_adapter(tuned, sets[::-1]) == "A"
    assert scripts.evaluate.best_adapter({}, sets) is None


# --- end to end through main.main --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", kind="chatml")


class Generation:
    """Wraps scripts.answers.generate: counts the answers generated; hostile=True answers with writes instead."""

    def __init__(self, monkeypatch, hostile: bool = False) -> None:
        self.count = 0
        real = scripts.answers.generate

        def generate(model, tokenizer, prompts, *, done=None, skip=(), **kwargs):
            todo = [i for i in range(len(prompts)) if i not in set(skip)]
            self.count += len(todo)
            if not hostile:
                return real(model, tokenizer, prompts, done=done, skip=skip, **kwargs)
            texts = [HOSTILE[i % len(HOSTILE)] for i in todo]
            done(todo, texts, 0.0)
            return [texts[todo.index(i)] if i in todo else None for i in range(len(prompts))]

        monkeypatch.setattr(scripts.answers, "generate", generate)


def run_main(root: Path, monkeypatch, model: Path, *args: str, hostile: bool = False) -> tuple[int, Generation]:
    """main.main in root with no .env and no environment settings; Spider's zip names a file that does not exist."""
    (root / "empty.env").write_text("")
    with monkeypatch.context() as m:
        m.chdir(root)
        for key in ENV_KEYS:
            m.delenv(key, raising=False)
        generation = Generation(m, hostile)
        status = main.main(["--model", str(model), "--spider-zip", str(root / "no" / "spider_data.zip"),
                            "--results-dir", "results", "--eval-batch-size", "4", "--max-new-tokens", "16",
                            "--quantization", "none", "--sample-size-eval", "all", "--env-file", "empty.env", *args])
    return status, generation


def kinds(db: Path) -> dict[str, int]:
    """Rows per run kind in the results store."""
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT r.kind, COUNT(s.example_key) FROM runs r LEFT JOIN sql_results s "
                                 "ON s.run_id = r.id GROUP BY r.id").fetchall())
    finally:
        conn.close()


def test_own_data_end_to_end_without_spider(data, tmp_path, monkeypatch, model, caplog):
    sets = ["--eval-dataset", f"{data.eval},{data.holdout}", "--databases", str(data.dbs)]
    before = snapshot(data.dbs)
    out = tmp_path / "results"

    # 1. the base model on both evaluation sets, answering with writes: scored wrong, databases untouched
    status, generation = run_main(tmp_path, monkeypatch, model, *sets, "--stages", "baseline_ex", hostile=True)
    assert status == 0 and generation.count == USABLE_EVAL + len(HOLDOUT)
    assert not (tmp_path / "data").exists() and not (tmp_path / "no").exists()  # no Spider anywhere
    assert snapshot(data.dbs) == before and not list(tmp_path.rglob("stolen.sqlite"))
    for name, n in (("my_eval", USABLE_EVAL), ("holdout", len(HOLDOUT))):
        saved = json.loads((out / "stages" / f"baseline_ex@{name}.json").read_text())["result"]
        assert saved["count"] == saved["total"] == n and saved["ex"] == 0.0
        assert "ok" not in saved["errors"]
        assert len((out / "eval_sets" / f"{name}.jsonl").read_text().splitlines()) == n
    assert kinds(out / "results.sqlite") == {"baseline_ex@my_eval": USABLE_EVAL, "baseline_ex@holdout": len(HOLDOUT)}
    assert f"{data.eval}: 1 of 7 examples left out, their db_id has no database" in caplog.text

    # 2. train on the user's train set, evaluate each adapter on both sets, report
    status, generation = run_main(tmp_path, monkeypatch, model, *sets, "--ft-dataset", str(data.train),
                                  "--training-configs", json.dumps(TRAINING_CONFIGS),
                                  "--stages", "preprocess,train,eval_adapters,report")
    assert status == 0 and generation.count == 2 * (USABLE_EVAL + len(HOLDOUT))
    rows = [json.loads(line) for line in (out / "train_chat.jsonl").read_text().splitlines()]
    assert len(rows) == USABLE_TRAIN and {r["db_id"] for r in rows} == {"pets", "shop"}
    assert all("CREATE TABLE" in r["prompt"] for r in rows)  # schemas read from the user's databases
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["eval_sets"]] == ["my_eval", "holdout"]
    assert results["eval_sets"][0]["database_dir"] == str(data.dbs)
    assert results["baseline"]["ex_by_set"]["holdout"]["count"] == len(HOLDOUT)  # the saved baseline, reused
    assert len(results["runs"]) == 2
    for name, run in results["runs"].items():
        assert set(run["ex_by_set"]) == {"my_eval", "holdout"} and run["ex"] == run["ex_by_set"]["my_eval"]
        assert run["ex_by_set"]["my_eval"]["count"] == USABLE_EVAL
    best = max(results["runs"].values(), key=lambda r: r["ex_by_set"]["my_eval"]["ex"])
    assert results["best_adapter"] == best["adapter_dir"]
    report = (out / "report.md").read_text()
    assert "Execution accuracy per evaluation set" in report and "`holdout` EX %" in report
    assert "Evaluation set `my_eval`" in report
    assert sorted(kinds(out / "results.sqlite")) == sorted(
        ["baseline_ex@my_eval", "baseline_ex@holdout"] + [f"ex_{n}@{s}" for n in results["runs"]
                                                          for s in ("my_eval", "holdout")])
    assert snapshot(data.dbs) == before

    # 3. reruns: the same content at other paths reuses everything; changed content redoes only what it touches
    moved = tmp_path / "moved"
    shutil.copytree(data.dbs, moved / "dbs")
    moved_sets = ["--eval-dataset", f"{write_json(moved / 'my_eval.json', EVAL)},"
                  f"{write_jsonl(moved / 'holdout.jsonl', HOLDOUT)}", "--databases", str(moved / "dbs")]
    preprocess_key = json.loads((out / "stages" / "preprocess.json").read_text())["fingerprint"]
    status, generation = run_main(tmp_path, monkeypatch, model, *moved_sets, "--ft-dataset",
                                  str(write_jsonl(moved / "train.jsonl", TRAIN)),
                                  "--training-configs", json.dumps(TRAINING_CONFIGS),
                                  "--stages", "baseline_ex,preprocess,train,eval_adapters")
    assert status == 0 and generation.count == 0  # nothing generated again
    assert json.loads((out / "stages" / "preprocess.json").read_text())["fingerprint"] == preprocess_key
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("tiny-")) == sorted(results["runs"])  # same runs

    write_jsonl(moved / "holdout.jsonl", [dict(HOLDOUT[0], query="SELECT city FROM owners GROUP BY city")] + HOLDOUT[1:])
    status, generation = run_main(tmp_path, monkeypatch, model, *moved_sets, "--stages", "baseline_ex")
    assert status == 0 and generation.count == len(HOLDOUT)  # the changed set only, same path as before

    conn = sqlite3.connect(moved / "dbs" / "shop" / "shop.sqlite")
    conn.execute("INSERT INTO items VALUES (4, 'ink', 2.0)")
    conn.commit()
    conn.close()
    status, generation = run_main(tmp_path, monkeypatch, model, *moved_sets, "--stages", "baseline_ex")
    assert status == 0 and generation.count == USABLE_EVAL + len(HOLDOUT)  # both sets use the shop database
    assert snapshot(data.dbs) == before


def bad_mmlu(root: Path) -> Path:
    """An MMLU folder whose test CSV is Latin-1, not UTF-8."""
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
        (root / split / f"astronomy_{split}.csv").write_bytes("Qu'est-ce?,caf\u00e9,b,c,d,A\n".encode("latin-1"))
    return root


def rejected_zip(root: Path) -> Path:
    """A zip with dev.json but no tables.json (Spider's layout not complete)."""
    with zipfile.ZipFile(root / "spider_data.zip", "w") as archive:
        archive.writestr("spider_data/dev.json", "[]")
        archive.writestr("spider_data/train_spider.json", "[]")
    return root / "spider_data.zip"


@pytest.mark.parametrize("make_args, message", [
    (lambda r, d: ["--eval-dataset", str(r / "missing.json")],
     "PATH_TASK_EVAL_DATASET (--eval-dataset): {root}/missing.json not found"),
    (lambda r, d: ["--eval-dataset", str(_text(r / "e.json", "[{"))], "{root}/e.json is not valid JSON"),
    (lambda r, d: ["--ft-dataset", str(_text(r / "t.jsonl", '{"question": "q"}\n'))], "{root}/t.jsonl: line 1 lacks"),
    (lambda r, d: ["--databases", str(r / "e.json")], "PATH_DATABASES (--databases): {root}/e.json not found"),
    (lambda r, d: ["--results-dir", str(_text(r / "taken", "x"))], "RESULTS_DIR (--results-dir) {root}/taken is a file"),
    (lambda r, d: ["--db-path", str(_text(r / "store.sqlite", "not sqlite"))], "is not an SQLite database"),
    (lambda r, d: ["--mmlu", str(bad_mmlu(r / "mmlu")), "--stages", "baseline_mmlu"], "is not UTF-8 text"),
    (lambda r, d: ["--stages", ","], "names no stage"),
    (lambda r, d: ["--sql-timeout", "nan"], "SQL_TIMEOUT_S (--sql-timeout) must be a finite number"),
    (lambda r, d: ["--env-file", str(r / "missing.env")], "--env-file {root}/missing.env not found"),
    (lambda r, d: ["--training-configs", str(r / "missing.json")], "file {root}/missing.json not found"),
    (lambda r, d: ["--training-configs", str(_text(r / "c.json", "[{]"))], "file {root}/c.json is not valid JSON"),
    (lambda r, d: ["--spider-zip", str(rejected_zip(r)), "--databases", str(d.dbs)], "tables.json is missing"),
])
def test_bad_inputs_stop_main_with_status_2_before_anything_is_written(data, tmp_path, monkeypatch, model, caplog,
                                                                       capsys, make_args, message):
    root = tmp_path / "run"
    root.mkdir()
    args = make_args(root, data)
    (root / "empty.env").write_text("")
    created_by_test = set(root.rglob("*"))
    caplog.set_level(logging.ERROR, logger="main")
    with monkeypatch.context() as m:
        m.chdir(root)
        for key in ENV_KEYS:
            m.delenv(key, raising=False)
        status = main.main(["--model", str(model), "--env-file", "empty.env", "--eval-dataset", str(data.eval),
                            "--databases", str(data.dbs), "--stages", "baseline_ex", "--results-dir", "results",
                            *args])
    assert status == 2
    errors = [r.getMessage() for r in caplog.records if r.name == "main" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and message.format(root=root) in errors[0], errors
    assert "Traceback" not in capsys.readouterr().err
    assert set(root.rglob("*")) == created_by_test  # no results folder, no store, nothing unpacked


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
