"""The bundled demo data set: build it, every gold query runs, tables.json matches the databases, MMLU CSVs parse."""
import csv
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from scripts.databases import schema_text
from scripts.demo_data import DEMO_SOURCE, build_demo_data, natural_name, spider_type
from scripts.errors import UserError
from scripts.spider_data import missing_databases
from scripts.spider_release import load_split, prepare_spider

SQL_FEATURES = ("JOIN", "GROUP BY", "HAVING", "ORDER BY", "LIMIT", "(SELECT", "INTERSECT", "EXCEPT", "NOT IN")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The demo built once for this module, and unpacked through stage 1."""
    out = tmp_path_factory.mktemp("demo")
    zip_path, mmlu_dir = build_demo_data(out)
    layout = prepare_spider(zip_path, out / "unpacked")
    return out, zip_path, mmlu_dir, layout


def run_read_only(db_path: Path, sql: str) -> list:
    con = sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_build_returns_zip_and_mmlu_and_stage1_accepts_it(built):
    out, zip_path, mmlu_dir, layout = built
    assert zip_path == out / "spider_data.zip" and mmlu_dir == out / "mmlu"
    assert layout.root == out / "unpacked" / "spider_data"
    train, dev = load_split(layout, "train"), load_split(layout, "dev")
    assert len(train) >= 90 and len(dev) >= 35
    assert missing_databases(layout, train + dev) == {}
    assert {e["db_id"] for e in train} == {e["db_id"] for e in dev} == {"library", "school", "shop", "music_festival"}


@pytest.mark.parametrize("split", ["train", "dev"])
def test_every_gold_query_returns_rows(built, split):
    layout = built[3]
    for example in load_split(layout, split):
        rows = run_read_only(layout.db_path(example["db_id"]), example["query"])
        assert rows, f"empty result: {example}"
        assert rows not in ([(0,)], [(None,)]), f"trivial result {rows}: {example}"


@pytest.mark.parametrize("split", ["train", "dev"])
def test_each_split_covers_easy_to_extra_hard_sql(built, split):
    queries = [e["query"] for e in load_split(built[3], split)]
    for feature in SQL_FEATURES:
        assert any(feature in q for q in queries), f"{split} has no query with {feature}"
    assert any(" JOIN " not in q and " WHERE " not in q for q in queries)  # the easy end


def test_train_and_dev_share_no_question(built):
    layout = built[3]
    train = {e["question"].lower() for e in load_split(layout, "train")}
    dev = [e["question"].lower() for e in load_split(layout, "dev")]
    assert not train & set(dev)
    assert len(dev) == len(set(dev)) and len(train) == len(load_split(layout, "train"))


def test_tables_json_matches_the_databases(built):
    layout = built[3]
    entries = json.loads(layout.tables_file.read_text())
    assert sorted(e["db_id"] for e in entries) == ["library", "music_festival", "school", "shop"]
    for entry in entries:
        db = layout.db_path(entry["db_id"])
        tables = [r[0] for r in run_read_only(db, "SELECT name FROM sqlite_master WHERE type='table' ORDER BY rowid")]
        assert entry["table_names_original"] == tables
        assert entry["table_names"] == [t.replace("_", " ") for t in tables]
        columns = entry["column_names_original"]
        assert columns[0] == [-1, "*"]
        expected = [[t, row[1]] for t, table in enumerate(tables) for row in run_read_only(db, f"PRAGMA table_info({table})")]
        assert columns[1:] == expected
        assert len(entry["column_names"]) == len(columns) == len(entry["column_types"])
        assert set(entry["column_types"]) <= {"text", "number", "time", "boolean", "others"}
        for key in entry["primary_keys"]:
            for i in key if isinstance(key, list) else [key]:
                table, column = tables[columns[i][0]], columns[i][1]
                pk = {r[1] for r in run_read_only(db, f"PRAGMA table_info({table})") if r[5]}
                assert column in pk
        declared = {
            (table, r[3], r[2], r[4]) for table in tables for r in run_read_only(db, f"PRAGMA foreign_key_list({table})")
        }
        found = {(tables[columns[a][0]], columns[a][1], tables[columns[b][0]], columns[b][1]) for a, b in entry["foreign_keys"]}
        assert found == declared and len(declared) >= 2


def test_schema_text_of_a_demo_database(built):
    text = schema_text(built[3].db_path("shop"), 2)
    assert "CREATE TABLE orders" in text and "FOREIGN KEY (customer_id) REFERENCES customer(customer_id)" in text
    assert text.count('INSERT INTO "product"') == 2


def test_mmlu_csvs_parse_in_the_official_layout(built):
    mmlu_dir = built[2]
    subjects = {split: sorted(p.name.rsplit("_", 1)[0] for p in (mmlu_dir / split).glob("*.csv")) for split in ("dev", "test")}
    assert subjects["dev"] == subjects["test"] and len(subjects["dev"]) == 3
    for split, expected_rows in (("dev", 5), ("test", 10)):
        for subject in subjects[split]:
            with (mmlu_dir / split / f"{subject}_{split}.csv").open(newline="") as f:
                rows = list(csv.reader(f))
            assert len(rows) >= expected_rows if split == "test" else len(rows) == expected_rows
            assert all(len(r) == 6 and r[5] in "ABCD" and len(r[5]) == 1 for r in rows)
            assert len({r[0] for r in rows}) == len(rows)


def test_mmlu_loader_reads_the_demo(built):
    mmlu_data = pytest.importorskip("scripts.mmlu_data", reason="scripts/mmlu_data.py not written yet")
    questions = mmlu_data.load_mmlu(built[2], split="test")
    assert len(questions) >= 30 and {q["answer"] for q in questions} <= {"A", "B", "C", "D"}


def test_second_build_writes_nothing_and_builds_are_identical(built, tmp_path):
    out, zip_path, _, _ = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "unpacked" not in p.parts}
    assert build_demo_data(out) == (zip_path, out / "mmlu")
    assert {p: p.stat().st_mtime_ns for p in before} == before
    other_zip, _ = build_demo_data(tmp_path / "again")
    assert other_zip.read_bytes() == zip_path.read_bytes()


def copy_sources(tmp_path: Path) -> Path:
    source = tmp_path / "demo_src"
    shutil.copytree(DEMO_SOURCE, source)
    return source


def test_changed_source_rebuilds_the_zip(tmp_path):
    source = copy_sources(tmp_path)
    zip_path, _ = build_demo_data(tmp_path / "out", source)
    first = zip_path.read_bytes()
    dev = json.loads((source / "dev.json").read_text())
    dev[0]["question"] = "How many authors does the library have?"
    (source / "dev.json").write_text(json.dumps(dev))
    build_demo_data(tmp_path / "out", source)
    assert zip_path.read_bytes() != first
    layout = prepare_spider(zip_path, tmp_path / "unpacked")
    assert load_split(layout, "dev")[0]["question"] == "How many authors does the library have?"


def test_unknown_db_id_in_a_source_split_is_a_user_error(tmp_path):
    source = copy_sources(tmp_path)
    (source / "train.json").write_text(json.dumps([{"question": "q", "query": "SELECT 1", "db_id": "zoo"}]))
    with pytest.raises(UserError, match=r"train\.json: entry 1 uses db_id 'zoo'.*zoo\.sql"):
        build_demo_data(tmp_path / "out", source)


def test_bad_mmlu_row_is_a_user_error(tmp_path):
    source = copy_sources(tmp_path)
    path = next((source / "mmlu" / "test").glob("*.csv"))
    path.write_text(path.read_text() + "Only three,fields,here\n")
    with pytest.raises(UserError, match=r"row 11: expected 6 fields"):
        build_demo_data(tmp_path / "out", source)


def test_broken_foreign_key_in_a_sql_file_is_a_user_error(tmp_path):
    source = copy_sources(tmp_path)
    sql = source / "databases" / "library.sql"
    sql.write_text(sql.read_text() + "INSERT INTO loan VALUES (99, 999, 1, '2024-04-01', 0);\n")
    with pytest.raises(UserError, match="library.sql: rows break foreign keys"):
        build_demo_data(tmp_path / "out", source)


def test_spider_names_and_types():
    assert natural_name("pub_year") == "pub year" and natural_name("orderItem") == "order item"
    assert [spider_type(t) for t in ("INTEGER", "REAL", "TEXT", "varchar(20)", "DATE", "bool", "BLOB")] == [
        "number", "number", "text", "text", "time", "boolean", "others"]
