"""Stage 1: unpacking spider_data.zip once, validating the layout, loading splits, schema text, sampling."""
import json
import os
import sqlite3
import zipfile
from pathlib import Path

import pytest

from scripts import databases, spider_release
from scripts.databases import schema_text
from scripts.errors import UserError
from scripts.spider_data import missing_databases, sample_examples
from scripts.spider_release import load_split, prepare_spider

TRAIN = [
    {"question": "How many singers are there?", "query": "SELECT count(*) FROM singer", "db_id": "concert"},
    {"question": "Name the oldest singer.", "query": "SELECT name FROM singer ORDER BY age DESC LIMIT 1", "db_id": "concert"},
]
DEV = [
    {"question": "List all singer names.", "query": "SELECT name FROM singer", "db_id": "concert"},
    {"question": "How many stations?", "query": "SELECT count(*) FROM station", "db_id": "ghost"},
    {"question": "Count stations again.", "query": "SELECT count(*) FROM station", "db_id": "ghost"},
]


def make_concert_db(path: Path) -> Path:
    """A small SQLite database: singer (4 rows, one long name) and a concert table with a foreign key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, age INTEGER)")
    con.execute("CREATE TABLE concert (concert_id INTEGER PRIMARY KEY, singer_id INTEGER REFERENCES singer(singer_id))")
    con.executemany("INSERT INTO singer VALUES (?, ?, ?)",
                    [(1, "Ann", 30), (2, "Bo's", 41), (3, "x" * 200, 25), (4, "Dee", None)])
    con.execute("INSERT INTO concert VALUES (1, 2)")
    con.commit()
    con.close()
    return path


def make_spider_folder(root: Path, *, with_others: bool = False) -> Path:
    """A Spider-layout folder: train_spider.json, dev.json, tables.json, one database (dev's 'ghost' has none)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train_spider.json").write_text(json.dumps(TRAIN))
    (root / "dev.json").write_text(json.dumps(DEV, indent=1))
    (root / "tables.json").write_text(json.dumps([{"db_id": "concert"}, {"db_id": "ghost"}]))
    if with_others:
        (root / "train_others.json").write_text(json.dumps([{"question": "q", "query": "SELECT 1", "db_id": "geo"}]))
    make_concert_db(root / "database" / "concert" / "concert.sqlite")
    return root


def zip_folder(folder: Path, zip_path: Path, prefix: str = "spider_data/") -> Path:
    """Zip the folder's files under `prefix` ('' puts them at the top level)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return zip_path


@pytest.fixture
def spider_zip(tmp_path) -> Path:
    return zip_folder(make_spider_folder(tmp_path / "src"), tmp_path / "spider_data.zip")


@pytest.mark.parametrize("prefix", ["spider_data/", "other_name/", ""])
def test_unpack_and_validate_any_top_folder(tmp_path, prefix):
    zip_path = zip_folder(make_spider_folder(tmp_path / "src", with_others=True), tmp_path / "s.zip", prefix)
    layout = prepare_spider(zip_path, tmp_path / "out")
    assert layout.root == tmp_path / "out" / prefix.rstrip("/")
    assert [p.name for p in layout.split_files["train"]] == ["train_spider.json", "train_others.json"]
    train = load_split(layout, "train")
    assert [e["db_id"] for e in train] == ["concert", "concert", "geo"]
    assert load_split(layout, "dev") == DEV
    assert layout.db_path("concert") == layout.database_dir / "concert" / "concert.sqlite"
    assert layout.db_path("ghost") is None


def test_unpacked_folder_is_accepted_as_is(tmp_path):
    folder = make_spider_folder(tmp_path / "mine" / "spider")
    layout = prepare_spider(tmp_path / "mine", tmp_path / "unused")
    assert layout.root == folder and not (tmp_path / "unused").exists()
    assert [p.name for p in layout.split_files["train"]] == ["train_spider.json"]  # train_others is optional


def test_second_call_does_not_extract_again_but_a_changed_zip_does(spider_zip, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare_spider(spider_zip, out)
    calls = []
    real_extract = spider_release._extract
    monkeypatch.setattr(spider_release, "_extract", lambda *a: calls.append(a) or real_extract(*a))
    prepare_spider(spider_zip, out)
    assert calls == []
    zip_folder(make_spider_folder(tmp_path / "src2", with_others=True), spider_zip)  # a new zip at the same path
    os.utime(spider_zip, ns=(0, spider_zip.stat().st_mtime_ns + 10**9))
    layout = prepare_spider(spider_zip, out)
    assert len(calls) == 1 and len(load_split(layout, "train")) == 3


def test_folder_not_made_by_the_pipeline_is_not_overwritten(spider_zip, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not unpacked by this pipeline"):
        prepare_spider(spider_zip, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_missing_zip(tmp_path):
    with pytest.raises(UserError, match=r"nothere\.zip does not exist.*PATH_SPIDER_ZIP"):
        prepare_spider(tmp_path / "nothere.zip", tmp_path / "out")


def test_not_a_zip(tmp_path):
    bad = tmp_path / "spider_data.zip"
    bad.write_text("<html>404</html>")
    with pytest.raises(UserError, match="not a zip file"):
        prepare_spider(bad, tmp_path / "out")


def test_truncated_zip(spider_zip, tmp_path):
    data = spider_zip.read_bytes()
    spider_zip.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="spider_data.zip"):
        prepare_spider(spider_zip, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_crc_error_is_reported_and_leaves_nothing_half_unpacked(tmp_path):
    zip_path = tmp_path / "s.zip"
    folder = make_spider_folder(tmp_path / "src")
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, "spider_data/" + path.relative_to(folder).as_posix())
    data = bytearray(zip_path.read_bytes())
    offset = data.index(b'"question"')  # inside a stored (uncompressed) member
    data[offset + 2] ^= 0xFF
    zip_path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged.*CRC"):
        prepare_spider(zip_path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_dev_json(tmp_path):
    folder = make_spider_folder(tmp_path / "src")
    (folder / "dev.json").unlink()
    with pytest.raises(UserError, match="holds no dev.json"):
        prepare_spider(zip_folder(folder, tmp_path / "s.zip"), tmp_path / "out")


def test_rejected_zip_leaves_nothing_unpacked(tmp_path):
    """The zip is validated in a staging folder: nothing of it stays, not even the parent folders made for it."""
    folder = make_spider_folder(tmp_path / "src")
    (folder / "tables.json").unlink()
    zip_path = zip_folder(folder, tmp_path / "s.zip")
    with pytest.raises(UserError, match=r"s\.zip: spider_data/tables\.json is missing"):
        prepare_spider(zip_path, tmp_path / "data" / "spider_data")
    assert not (tmp_path / "data").exists()


def test_missing_tables_json(tmp_path):
    folder = make_spider_folder(tmp_path / "src")
    (folder / "tables.json").unlink()
    with pytest.raises(UserError, match=r"tables\.json is missing"):
        prepare_spider(folder, tmp_path / "out")


def test_malformed_json_names_file_line_and_column(tmp_path):
    folder = make_spider_folder(tmp_path / "src")
    (folder / "dev.json").write_text('[\n {"question": "q",\n  "query": oops}\n]')
    with pytest.raises(UserError, match=r"dev\.json is not valid JSON: .* line 3, column 12"):
        prepare_spider(folder, tmp_path / "out")


def test_entry_without_required_field(tmp_path):
    folder = make_spider_folder(tmp_path / "src")
    (folder / "train_spider.json").write_text(json.dumps(TRAIN + [{"question": "q", "db_id": "concert"}]))
    with pytest.raises(UserError, match=r"train_spider\.json: entry 3 lacks query"):
        prepare_spider(folder, tmp_path / "out")


def test_missing_database_is_reported_not_fatal(spider_zip, tmp_path):
    layout = prepare_spider(spider_zip, tmp_path / "out")
    assert missing_databases(layout, load_split(layout, "dev")) == {"ghost": 2}
    assert missing_databases(layout, load_split(layout, "train")) == {}
    lfs_pointer = layout.database_dir / "ghost" / "ghost.sqlite"
    lfs_pointer.parent.mkdir()
    lfs_pointer.write_text("version https://git-lfs.github.com/spec/v1\n")
    assert layout.db_path("ghost") is None


def test_load_split_returns_copies(spider_zip, tmp_path):
    layout = prepare_spider(spider_zip, tmp_path / "out")
    load_split(layout, "dev")[0]["question"] = "changed"
    assert load_split(layout, "dev")[0]["question"] == DEV[0]["question"]


def test_schema_text_statements_rows_and_cache(tmp_path):
    db = make_concert_db(tmp_path / "c.sqlite")
    databases._schema_text_cached.cache_clear()
    plain = schema_text(db)
    assert plain.startswith("CREATE TABLE singer (") and "CREATE TABLE concert (" in plain
    assert plain.index("singer (") < plain.index("concert (") and "INSERT" not in plain
    with_rows = schema_text(db, sample_rows=3)
    lines = with_rows.splitlines()
    assert lines.count('INSERT INTO "singer" VALUES (1, \'Ann\', 30);') == 1
    assert 'INSERT INTO "singer" VALUES (2, \'Bo\'\'s\', 41);' in lines
    long_line = next(line for line in lines if "xxx" in line)
    assert "x" * 41 not in long_line and "..." in long_line
    assert sum(line.startswith('INSERT INTO "singer"') for line in lines) == 3
    assert sum(line.startswith('INSERT INTO "concert"') for line in lines) == 1
    assert schema_text(db, 3) == with_rows and schema_text(tmp_path / "." / "c.sqlite", 3) == with_rows
    info = databases._schema_text_cached.cache_info()
    assert info.misses == 2 and info.hits == 2


def test_schema_text_reads_only_and_never_creates(tmp_path):
    db = make_concert_db(tmp_path / "c.sqlite")
    before = db.read_bytes()
    schema_text(db, 2)
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.sqlite"]
    with pytest.raises(UserError, match=r"absent\.sqlite is not found"):
        schema_text(tmp_path / "absent.sqlite")
    assert not (tmp_path / "absent.sqlite").exists()


def test_sample_examples_seeded_stable_and_none_is_all():
    items = [{"i": i} for i in range(100)]
    a = sample_examples(items, 10, seed=3)
    assert a == sample_examples(items, 10, seed=3) and len(a) == 10
    assert a != sample_examples(items, 10, seed=4)
    assert [x["i"] for x in a] == sorted(x["i"] for x in a)  # original order kept
    assert sample_examples(items, None, seed=3) == items and sample_examples(items, 1000, seed=3) == items
    with pytest.raises(UserError):
        sample_examples(items, 0, seed=3)


# --- the real data in $TEXT2SQL_DATA -------------------------------------------------------------------

def check_real_layout(layout) -> None:
    """The real Spider: 7000 train, 1034 dev, wta_1's 62 dev examples without a database."""
    train, dev = load_split(layout, "train"), load_split(layout, "dev")
    assert len(train) == 7000 and len(dev) == 1034
    assert missing_databases(layout, dev) == {"wta_1": 62}
    assert set(missing_databases(layout, train)) <= {"baseball_1", "soccer_1"}
    text = schema_text(layout.db_path("concert_singer"), 1)
    assert 'CREATE TABLE "singer"' in text and 'INSERT INTO "singer" VALUES (1,' in text


def test_real_unpacked_folder(real_spider, tmp_path):
    check_real_layout(prepare_spider(real_spider, tmp_path / "unused"))


def test_real_zip_unpacks_into_tmp(real_spider, tmp_path):
    zip_path = real_spider.parent / "spider_data.zip"
    if not zip_path.is_file():
        pytest.skip(f"{zip_path} not found")
    layout = prepare_spider(zip_path, tmp_path / "spider")
    assert layout.root == tmp_path / "spider" / "spider_data"
    check_real_layout(layout)
