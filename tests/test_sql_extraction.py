"""SQL extraction from what models actually write around their SQL (chat prose, fences, base-model continuations)."""
import sqlite3

import pytest

from scripts.sql_extraction import Extraction, extract, extract_sql, one_line

CASES = [
    # SmolLM2-135M-Instruct's usual shape: prose, a fenced block, more prose
    (
        "To find the number of singers, you can use the following SQL query:\n\n```sql\nSELECT COUNT(*)\nFROM singer;\n```\n\n"
        "This query counts all rows in the `singer` table.",
        "SELECT COUNT(*) FROM singer",
    ),
    ("```\nSELECT name FROM stadium WHERE capacity > 5000\n```", "SELECT name FROM stadium WHERE capacity > 5000"),
    ("SELECT name FROM singer ORDER BY age DESC;", "SELECT name FROM singer ORDER BY age DESC"),
    ("  select count(*) from head where age  >  56  ", "select count(*) from head where age > 56"),
    ("SELECT a FROM t; SELECT b FROM u;", "SELECT a FROM t"),
    ("SELECT name FROM t WHERE note = 'a;b' ; DROP TABLE t", "SELECT name FROM t WHERE note = 'a;b'"),
    ("```python\nprint('hi')\n```\n```sql\nSELECT 1\n```", "SELECT 1"),
    ("```sql\nSELECT name\nFROM singer", "SELECT name FROM singer"),  # cut off by max_new_tokens
    # chat prose whose English holds the keywords
    ("To list the singers with an age above 30, use: SELECT name FROM singer WHERE age > 30",
     "SELECT name FROM singer WHERE age > 30"),
    ("You can select the names like this: SELECT name FROM singer", "SELECT name FROM singer"),
    ("Select all singers from France:\nSELECT name FROM singer WHERE country = 'France'",
     "SELECT name FROM singer WHERE country = 'France'"),
    ("Here is the query: SELECT id FROM t\n\nExplanation: it selects ids.", "SELECT id FROM t"),
    ("Use `SELECT count(*) FROM singer` to count them.", "SELECT count(*) FROM singer"),
    ("SELECT id FROM t. This returns the ids.", "SELECT id FROM t"),
    ("Sure! Here's the SQL query with the singers older than 30:\n\n    SELECT name\n    FROM singer\n    WHERE age > 30\n\n"
     "This query selects the `name` column with a condition on `age`.", "SELECT name FROM singer WHERE age > 30"),
    ("SELECT name FROM singer\nThis returns each singer's name, with the oldest first.", "SELECT name FROM singer"),
    # base-model continuations after the answer (plain prompt style)
    ("SELECT id FROM t\n### Question\nHow many?", "SELECT id FROM t"),
    ("SELECT name FROM singer ### Question: how many singers?", "SELECT name FROM singer"),
    ("SELECT name FROM singer\nQuestion: How many singers are there?\nSELECT count(*) FROM singer",
     "SELECT name FROM singer"),
    ("SELECT name FROM singer\nSELECT count(*) FROM singer", "SELECT name FROM singer"),
    ("SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.singer_id\nA: SELECT 1",
     "SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.singer_id"),
    ("SELECT count(*) FROM head WHERE age > 56\n\n### Instructions\nYou are an expert in SQLite.",
     "SELECT count(*) FROM head WHERE age > 56"),
    # statements over several lines, CTEs, set operations
    ("WITH x AS (SELECT 1 AS v) SELECT v FROM x", "WITH x AS (SELECT 1 AS v) SELECT v FROM x"),
    ("WITH older AS (\n  SELECT * FROM singer WHERE age > 30\n)\nSELECT name FROM older",
     "WITH older AS ( SELECT * FROM singer WHERE age > 30 ) SELECT name FROM older"),
    ("SELECT name FROM singer UNION\nSELECT country FROM singer", "SELECT name FROM singer UNION SELECT country FROM singer"),
    ("SELECT name\nFROM singer\nWHERE age >\n30\nORDER BY age", "SELECT name FROM singer WHERE age > 30 ORDER BY age"),
    # strings and comments holding keywords, `;`, `###` or quotes
    ("SELECT name FROM singer WHERE name = 'a;b -- SELECT ### x' ORDER BY age",
     "SELECT name FROM singer WHERE name = 'a;b -- SELECT ### x' ORDER BY age"),
    ("SELECT name FROM singer -- the singer's names\nWHERE age > 3", "SELECT name FROM singer WHERE age > 3"),
    ('SELECT "Song Name" FROM song WHERE title = "Don\'t; stop"', 'SELECT "Song Name" FROM song WHERE title = "Don\'t; stop"'),
    # malformed or cut-off SQL stays as written, so it scores as the syntax error it is
    ("SELECT name FROM singer WHERE", "SELECT name FROM singer WHERE"),
    ("SELECT name, FROM singer", "SELECT name, FROM singer"),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_extracts_the_query(text: str, expected: str) -> None:
    assert extract_sql(text) == expected


@pytest.mark.parametrize("text", ["", "I don't know.", "The answer is 42.", "```\n\n```",
                                  "I'm sorry, I cannot help with that.",
                                  "Which singers should I select? Please give me more details."])
def test_output_without_sql_gives_empty(text: str) -> None:
    assert extract_sql(text) == ""


def test_whitespace_inside_string_values_is_kept() -> None:
    assert extract_sql("SELECT id\n  FROM t WHERE name = 'New  York'  AND x = 1") == (
        "SELECT id FROM t WHERE name = 'New  York' AND x = 1"
    )


@pytest.fixture
def singer_db(tmp_path):
    """A database with one table, to compile candidates against."""
    path = tmp_path / "singer.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER)")
    return path


@pytest.mark.parametrize("text, without_db, with_db", [
    # a trailing clause on a line that ends in prose: the prose is cut, the clause stays
    ("SELECT name\nFROM singer\nWHERE age > 30 which gives the older ones",
     "SELECT name FROM singer WHERE age > 30", "SELECT name FROM singer WHERE age > 30"),
    # prose that SQLite's grammar accepts (`where the` is a column named "the") fails on the database
    ("SELECT name FROM singer\nwhere the singers are listed", "SELECT name FROM singer", "SELECT name FROM singer"),
    # the first statement names an unknown column; the second is the one that runs
    ("Select all singers from France: SELECT name FROM singers\n\nOr: SELECT name FROM singer WHERE country = 'France'",
     "SELECT name FROM singers", "SELECT name FROM singer WHERE country = 'France'"),
])
def test_the_database_decides_between_candidates(singer_db, text, without_db, with_db) -> None:
    assert extract_sql(text) == without_db
    assert extract_sql(text, singer_db) == with_db


def test_extraction_never_writes_the_database(singer_db) -> None:
    before = singer_db.read_bytes()
    assert extract_sql("WITH x AS (SELECT 1) DELETE FROM singer", singer_db) == "WITH x AS (SELECT 1) DELETE FROM singer"
    assert extract_sql("SELECT 1; DROP TABLE singer", singer_db) == "SELECT 1"
    assert singer_db.read_bytes() == before


@pytest.fixture
def battle_db(tmp_path):
    """A database whose battle table has no lost_in_battle column (the model's query fails on it)."""
    path = tmp_path / "battle.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE battle (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("CREATE TABLE ship (id INTEGER PRIMARY KEY, lost_in_battle INTEGER, ship_type TEXT)")
        conn.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER)")
    return path


FAITHFUL = [
    # a query that fails on the database is scored whole, never as its subquery
    "SELECT DISTINCT id, name FROM battle WHERE lost_in_battle IN (SELECT id FROM ship WHERE ship_type = 'Brig')",
    # nor as the query before its UNION
    "SELECT name FROM singer UNION SELECT nam FROM singer",
    "SELECT name FROM singer WHERE age > = 30",  # the metric repairs `> =` itself, as the official evaluator does
    "SELECT name FROM singer WHERE age > 30 AND AND country = 'France'",  # broken: stays broken
    "SELECT name FROM singer WHERE age > 30)",  # a stray parenthesis, with the condition before it
    "SELECT name FROM singer WHERE country = 'France' AND",  # cut off by the token limit
]


@pytest.mark.parametrize("sql", FAITHFUL)
def test_the_models_statement_is_taken_whole(battle_db, sql) -> None:
    for text in (sql, f"```sql\n{sql}\n```", f"Here is the query:\n{sql}\n\nIt lists the names."):
        assert extract_sql(text, battle_db) == sql
        assert extract_sql(text) == sql


def test_a_statement_cut_by_the_token_limit_keeps_its_last_line() -> None:
    assert extract_sql("SELECT name FROM singer\nWHERE age >") == "SELECT name FROM singer WHERE age >"


def test_prose_with_an_apostrophe_before_the_query() -> None:
    assert extract_sql("Here is the query with the singer's name: SELECT name FROM singer") == "SELECT name FROM singer"
    assert extract_sql("SELECT name FROM singer WHERE name = 'O''Brien' -- the singer's name") == (
        "SELECT name FROM singer WHERE name = 'O''Brien'")


@pytest.mark.parametrize("text, sql, cut", [
    ("SELECT name FROM singer", "SELECT name FROM singer", False),
    ("SELECT name FROM singer;\nThis returns each singer's name.", "SELECT name FROM singer", False),  # ended by `;`
    ("SELECT name FROM singer\nThis returns each singer's name, with the oldest first.", "SELECT name FROM singer", True),
    ("SELECT name FROM singer WHERE age > 30 which gives the older ones", "SELECT name FROM singer WHERE age > 30",
     True),
    ("I cannot answer that.", "", False),
])
def test_extract_says_whether_prose_was_cut(text, sql, cut) -> None:
    assert extract(text) == Extraction(sql, cut)


def test_real_gold_queries_are_extracted_whole_from_chat_answers(real_spider) -> None:
    """Every Spider dev gold query, alone and wrapped in a chat answer, comes back as itself (on one line)."""
    import json

    from scripts.databases import databases_layout

    layout = databases_layout(real_spider / "database")
    examples = json.loads((real_spider / "dev.json").read_text())
    for example in examples:
        gold, db = example["query"], layout.db_path(example["db_id"])
        expected = one_line(gold)
        for text in (gold, f"Sure! Here is the SQL query:\n```sql\n{gold}\n```\nThis query answers the question."):
            assert extract_sql(text, db) == expected, (text, db)


def test_extraction_counts() -> None:
    from scripts.answers import extraction_counts

    counts = extraction_counts([Extraction(""), Extraction("SELECT 1", cut=True), Extraction("SELECT 2")])
    assert counts == {"answers": 3, "no_sql": 1, "prose_cut": 1}
