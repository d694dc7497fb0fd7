"""SQL extraction from what models actually write around their SQL."""
import pytest

from scripts.evaluate import extract_sql

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
    ("Here is the query: SELECT id FROM t\n\nExplanation: it selects ids.", "SELECT id FROM t"),
    ("SELECT id FROM t\n### Question\nHow many?", "SELECT id FROM t"),
    (
        "WITH x AS (SELECT 1 AS v) SELECT v FROM x",
        "WITH x AS (SELECT 1 AS v) SELECT v FROM x",
    ),
    ("```python\nprint('hi')\n```\n```sql\nSELECT 1\n```", "SELECT 1"),
    ("```sql\nSELECT name\nFROM singer", "SELECT name FROM singer"),  # cut off by max_new_tokens
]


@pytest.mark.parametrize("text, expected", CASES)
def test_extracts_the_first_statement(text: str, expected: str) -> None:
    assert extract_sql(text) == expected


@pytest.mark.parametrize("text", ["", "I don't know.", "The answer is 42.", "```\n\n```"])
def test_output_without_sql_gives_empty(text: str) -> None:
    assert extract_sql(text) == ""


def test_whitespace_inside_string_values_is_kept() -> None:
    assert extract_sql("SELECT id\n  FROM t WHERE name = 'New  York'  AND x = 1") == (
        "SELECT id FROM t WHERE name = 'New  York' AND x = 1"
    )
