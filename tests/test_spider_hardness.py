"""Official Spider hardness: hand-checked rules and quirks, and agreement with the official parse of dev."""
import json
from collections import Counter

import pytest

from custom_metrics.spider_hardness import SqlParseError, hardness, hardness_from_parsed, parse_sql, tokenize


@pytest.mark.parametrize(
    ("sql", "level"),
    [
        ("SELECT count(*) FROM singer", "easy"),
        ("SELECT name FROM t WHERE a = 1", "easy"),
        # WHERE + OR: component1 = 2, two conditions -> medium
        ("SELECT name FROM t WHERE a = 1 OR b = 2", "medium"),
        # two joins -> component1 = 2 -> medium; a WHERE on top -> 3 -> hard
        ("SELECT T1.a FROM t AS T1 JOIN u AS T2 ON T1.id = T2.id JOIN v AS T3 ON T2.id = T3.id", "medium"),
        ("SELECT T1.a FROM t AS T1 JOIN u AS T2 ON T1.id = T2.id JOIN v AS T3 ON T2.id = T3.id WHERE T1.b = 'x'", "hard"),
        # nested query in WHERE -> component2 = 1 -> hard; set operation likewise
        ("SELECT a FROM t WHERE a IN (SELECT a FROM u)", "hard"),
        ("SELECT a FROM t UNION SELECT a FROM u", "hard"),
        ("SELECT a, b FROM t EXCEPT SELECT a, b FROM u", "extra"),
        # a subquery in FROM is not a nested query
        ("SELECT a FROM (SELECT a FROM t)", "easy"),
        ("SELECT a FROM t ORDER BY b DESC LIMIT 1", "medium"),
        ("SELECT a FROM t WHERE b > = 3", "easy"),
    ],
)
def test_hardness_by_hand(sql, level):
    assert hardness(sql) == level


def test_not_flag_counts_as_an_aggregate_in_where():
    # official count_agg on WHERE cond units tests unit[0], the NOT flag
    assert hardness("SELECT count(*) FROM t WHERE a != 1") == "easy"
    assert hardness("SELECT count(*) FROM t WHERE a NOT IN (1, 2)") == "medium"


def test_and_in_having_counts_as_an_aggregate():
    # official count_agg(sql['having']) sees the 'and' string, whose [0] is never 0
    assert hardness("SELECT count(*) FROM t GROUP BY a HAVING count(*) > 1") == "easy"
    assert hardness("SELECT count(*) FROM t GROUP BY a HAVING count(*) > 1 AND sum(b) > 2") == "medium"


def test_parse_structure():
    sql = parse_sql("SELECT T1.name, count(*) FROM a AS T1 JOIN b AS T2 ON T1.id = T2.id "
                    "WHERE NOT T1.x LIKE '%z%' GROUP BY T1.name ORDER BY count(*) DESC LIMIT 3")
    assert [agg for agg, _ in sql["select"][1]] == [0, 3]
    assert [unit[0] for unit in sql["from"]["table_units"]] == ["table_unit", "table_unit"]
    assert sql["where"][0][0] is True and sql["where"][0][1] == 9  # NOT, LIKE
    assert sql["orderBy"][0] == "desc" and sql["orderBy"][1][0][1][0] == 3
    assert sql["limit"] == 3


def test_tokenizer_merges_split_comparisons_and_keeps_strings():
    assert tokenize("SELECT a FROM t WHERE b ! = 'It''s X'") == ["select", "a", "from", "t", "where", "b", "!=", "'It''s X'"]


@pytest.mark.parametrize("sql", ["SELEC a FROM t", "SELECT FROM WHERE", "SELECT a FROM t WHERE", "SELECT a FROM t garbage garbage", ""])
def test_unparseable_sql_raises(sql):
    with pytest.raises(SqlParseError):
        hardness(sql)


def test_dev_parser_agrees_with_the_official_parse(real_spider):
    dev = json.loads((real_spider / "dev.json").read_text())
    assert len(dev) == 1034
    mismatches = [e["query"] for e in dev if hardness(e["query"]) != hardness_from_parsed(e["sql"])]
    assert mismatches == []


def test_dev_distribution_is_the_published_one(real_spider):
    dev = json.loads((real_spider / "dev.json").read_text())
    counts = Counter(hardness_from_parsed(e["sql"]) for e in dev)
    assert counts == {"easy": 248, "medium": 446, "hard": 174, "extra": 166}
