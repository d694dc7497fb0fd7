"""Stage 3: Spider-format examples -> prompt/completion rows, sampling, long schemas, missing databases, jsonl."""
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.errors import UserError
from scripts.pre_proc import build_sft_dataset, load_jsonl, sample_subset, save_jsonl, schema_from_tables_json
from scripts.prompts import render
from tests.tiny_models import build_tokenizer


@dataclass
class Layout:
    """The part of SpiderLayout that pre-processing uses."""

    database_dir: Path
    tables_file: Path

    def db_path(self, db_id: str) -> Path | None:
        path = self.database_dir / db_id / f"{db_id}.sqlite"
        return path if path.exists() else None


def rows_schema(db_path: Path, sample_rows: int = 0) -> str:
    """A stand-in for databases.schema_text: CREATE statements, then `sample_rows` rows per table."""
    with sqlite3.connect(db_path) as con:
        tables = con.execute("SELECT name, sql FROM sqlite_master WHERE type='table'").fetchall()
        parts = []
        for name, sql in tables:
            parts.append(sql + ";")
            for row in con.execute(f"SELECT * FROM {name} LIMIT {sample_rows}").fetchall() if sample_rows else []:
                parts.append(f"-- {row}")
    return "\n".join(parts)


@pytest.fixture
def spider(tmp_path) -> Layout:
    """A two-database Spider layout: 'concert' with a long text table, 'ghost' only in tables.json."""
    db = tmp_path / "database" / "concert" / "concert.sqlite"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, age INTEGER)")
        con.executemany("INSERT INTO singer VALUES (?, ?, ?)", [(i, "name " * 40, 20 + i) for i in range(5)])
    tables = [{
        "db_id": "ghost", "table_names_original": ["a", "b"],
        "column_names_original": [[-1, "*"], [0, "id"], [1, "a_id"]], "column_types": ["text", "number", "number"],
        "primary_keys": [1], "foreign_keys": [[2, 1]],
    }]
    (tmp_path / "tables.json").write_text(json.dumps(tables))
    return Layout(tmp_path / "database", tmp_path / "tables.json")


def examples(n: int, db_id: str = "concert") -> list[dict]:
    return [{"db_id": db_id, "question": f"How many singers are older than {i}?",
             "query": f"SELECT count(*) FROM singer WHERE age > {i}"} for i in range(n)]


def test_rows_are_the_prompt_function_output(spider):
    tokenizer = build_tokenizer("chatml")
    data, stats = build_sft_dataset(examples(3), spider, tokenizer, max_length=4096, schema_fn=rows_schema)
    assert len(data) == 3 and stats["kept"] == 3
    schema = rows_schema(spider.db_path("concert"))
    expected = render(tokenizer, schema, "How many singers are older than 1?", "SELECT count(*) FROM singer WHERE age > 1")
    assert (data[1]["prompt"], data[1]["completion"]) == expected
    assert data[1]["num_tokens"] == len(tokenizer(expected[0] + expected[1], add_special_tokens=False)["input_ids"])


def test_sampling_is_seeded_and_none_means_all():
    items = [{"i": i} for i in range(50)]
    assert sample_subset(items, 10, seed=1) == sample_subset(items, 10, seed=1)
    assert sample_subset(items, 10, seed=1) != sample_subset(items, 10, seed=2)
    assert len(sample_subset(items, 10, seed=1)) == 10
    assert sample_subset(items, None, seed=1) == items


def test_long_prompts_drop_sample_rows_first_then_are_skipped(spider):
    tokenizer = build_tokenizer("chatml")
    no_rows, _ = build_sft_dataset(examples(2), spider, tokenizer, max_length=10_000, schema_fn=rows_schema)
    with_rows, _ = build_sft_dataset(examples(2), spider, tokenizer, max_length=10_000, sample_rows=3, schema_fn=rows_schema)
    short, long = max(no_rows["num_tokens"]), min(with_rows["num_tokens"])
    assert long > short

    shortened, stats = build_sft_dataset(examples(2), spider, tokenizer, max_length=short, sample_rows=3, schema_fn=rows_schema)
    assert stats["shortened"] == 2 and stats["kept"] == 2
    assert list(shortened["prompt"]) == list(no_rows["prompt"])

    none_left, stats = build_sft_dataset(examples(2), spider, tokenizer, max_length=min(no_rows["num_tokens"]) - 1, schema_fn=rows_schema)
    assert len(none_left) == 0 and stats["skipped_too_long"] == 2


def test_missing_database_uses_tables_json_or_is_skipped(spider):
    tokenizer = build_tokenizer("base")
    mixed = examples(1, "ghost") + examples(1, "nowhere") + examples(1)
    data, stats = build_sft_dataset(mixed, spider, tokenizer, max_length=4096, schema_fn=rows_schema)
    assert stats["schema_from_tables_json"] == 1 and stats["skipped_no_schema"] == 1 and stats["kept"] == 2
    assert data["db_id"] == ["ghost", "concert"]
    schema = schema_from_tables_json(spider.tables_file, "ghost")
    assert "CREATE TABLE a" in schema and "FOREIGN KEY (a_id) REFERENCES a(id)" in schema
    assert "id number PRIMARY KEY" in schema and schema in data[0]["prompt"]


def test_jsonl_round_trip_and_bad_file(spider, tmp_path):
    data, _ = build_sft_dataset(examples(4), spider, build_tokenizer("gemma"), max_length=4096, schema_fn=rows_schema)
    path = save_jsonl(data, tmp_path / "out" / "ft.jsonl")
    again = load_jsonl(path)
    assert again.to_list() == data.to_list()
    path.write_text('{"prompt": "p"}\n')
    with pytest.raises(UserError, match="rerun 'preprocess'"):
        load_jsonl(path)
    with pytest.raises(UserError, match="missing.jsonl is missing; run the .preprocess. stage first"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_default_schema_comes_from_the_databases_module(spider):
    databases = pytest.importorskip("scripts.databases", reason="scripts/databases.py not written yet")
    tokenizer = build_tokenizer("chatml")
    data, _ = build_sft_dataset(examples(1), spider, tokenizer, max_length=4096)
    assert databases.schema_text(spider.db_path("concert"), 0) in data[0]["prompt"]


def test_tables_json_schema_is_valid_sqlite_for_every_real_database(real_spider):
    """The fallback schema of each real Spider database executes in SQLite and has the database's tables."""
    entries = json.loads((real_spider / "tables.json").read_text())
    for entry in entries:
        script = schema_from_tables_json(real_spider / "tables.json", entry["db_id"])
        with sqlite3.connect(":memory:") as con:
            con.executescript(script)
            created = {r[0].lower() for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        expected = {t.lower() for t in entry["table_names_original"] if not t.lower().startswith("sqlite_")}
        assert created == expected, entry["db_id"]
