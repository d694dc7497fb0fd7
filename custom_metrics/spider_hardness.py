"""Official Spider hardness (easy/medium/hard/extra) of a gold SQL query, without needing the database.

`hardness_from_parsed` applies the rules of the official evaluator (Evaluator.eval_hardness in
taoyds/test-suite-sql-eval evaluation.py) to the structure of process_sql.get_sql, quirks included:
count_agg on WHERE/HAVING items tests item[0], which for a condition unit is its NOT flag and for the
'and'/'or' strings of HAVING is always true; a subquery in FROM is not a nested query; joins count
as (number of table units - 1). `parse_sql` is a small tokenizer + recursive-descent parser of
Spider's SQL subset that produces that structure, so `hardness(sql)` needs no schema.

Structure (as in process_sql; column ids are lower-cased names here):
  col_unit (agg_id, column, is_distinct); val_unit (unit_op, col_unit1, col_unit2);
  cond_unit (not_op, op_id, val_unit, val1, val2); condition [cond_unit, 'and'|'or', cond_unit, ...];
  sql {'select': (distinct, [(agg_id, val_unit)]), 'from': {'table_units', 'conds'}, 'where',
       'groupBy', 'having', 'orderBy': (dir, [val_unit]) or [], 'limit', 'intersect', 'union', 'except'}
"""
from __future__ import annotations

import re
from typing import Any

LEVELS = ("easy", "medium", "hard", "extra")

WHERE_OPS = ("not", "between", "=", ">", "<", ">=", "<=", "!=", "in", "like", "is", "exists")
UNIT_OPS = ("none", "-", "+", "*", "/")
AGG_OPS = ("none", "max", "min", "count", "sum", "avg")
CLAUSE_KEYWORDS = ("select", "from", "where", "group", "order", "limit", "intersect", "union", "except", "having")
SQL_OPS = ("intersect", "union", "except")
JOIN_WORDS = ("join", "inner", "left", "right", "full", "outer", "cross", "natural")
_LIKE = WHERE_OPS.index("like")
_NOT_COLUMNS = frozenset({"(", ")", ",", ";", "and", "or", "not", "on", "as", "by", "asc", "desc", "join"})


class SqlParseError(ValueError):
    """The SQL is outside the subset this parser understands (hardness is then 'unknown')."""


# ---------------------------------------------------------------- the rules (official structure)

def _has_agg(unit: Any) -> bool:
    """Official has_agg: item[0] differs from 0 (for cond units: the NOT flag; for 'and'/'or': always)."""
    return unit[0] != 0


def _count_agg(units: list) -> int:
    return sum(1 for unit in units if _has_agg(unit))


def _conds(sql: dict) -> list:
    """Condition units of FROM ... ON, WHERE and HAVING."""
    return sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]


def _conjunctions(sql: dict) -> list:
    return sql["from"]["conds"][1::2] + sql["where"][1::2] + sql["having"][1::2]


def count_component1(sql: dict) -> int:
    """WHERE, GROUP BY, ORDER BY, LIMIT, joins, ORs and LIKEs."""
    count = sum(bool(sql[key]) for key in ("where", "groupBy", "orderBy"))
    count += sql["limit"] is not None
    if sql["from"]["table_units"]:
        count += len(sql["from"]["table_units"]) - 1
    count += sum(1 for token in _conjunctions(sql) if token == "or")
    count += sum(1 for unit in _conds(sql) if unit[1] == _LIKE)
    return count


def nested_sql(sql: dict) -> list[dict]:
    """Official get_nestedSQL: subqueries as condition values plus INTERSECT/EXCEPT/UNION (not FROM)."""
    nested = []
    for unit in _conds(sql):
        nested.extend(value for value in (unit[3], unit[4]) if isinstance(value, dict))
    nested.extend(sql[op] for op in ("intersect", "except", "union") if sql[op] is not None)
    return nested


def count_component2(sql: dict) -> int:
    """Number of nested queries."""
    return len(nested_sql(sql))


def count_others(sql: dict) -> int:
    """Several aggregates, several select columns, several WHERE conditions, several GROUP BY columns."""
    agg = _count_agg(sql["select"][1]) + _count_agg(sql["where"][::2]) + _count_agg(sql["groupBy"])
    if sql["orderBy"]:
        units = sql["orderBy"][1]
        agg += _count_agg([u[1] for u in units if u[1]] + [u[2] for u in units if u[2]])
    agg += _count_agg(sql["having"])
    return sum((agg > 1, len(sql["select"][1]) > 1, len(sql["where"]) > 1, len(sql["groupBy"]) > 1))


def hardness_from_parsed(sql: dict) -> str:
    """Official Evaluator.eval_hardness on a process_sql-style structure (e.g. dev.json's `sql`)."""
    c1, c2, others = count_component1(sql), count_component2(sql), count_others(sql)
    if c1 <= 1 and others == 0 and c2 == 0:
        return "easy"
    if (others <= 2 and c1 <= 1 and c2 == 0) or (c1 <= 2 and others < 2 and c2 == 0):
        return "medium"
    if (
        (others > 2 and c1 <= 2 and c2 == 0)
        or (2 < c1 <= 3 and others <= 2 and c2 == 0)
        or (c1 <= 1 and others == 0 and c2 <= 1)
    ):
        return "hard"
    return "extra"


def hardness(gold_sql: str) -> str:
    """Official Spider hardness of a SQL query; raises SqlParseError when it cannot be parsed."""
    return hardness_from_parsed(parse_sql(gold_sql))


# ---------------------------------------------------------------- tokenizer

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>'(?:[^']|'')*'|"(?:[^"]|"")*")
  | (?P<quoted>`[^`]*`|\[[^\]]*\])
  | (?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_$]*(?:\s*\.\s*(?:[A-Za-z_][A-Za-z0-9_$]*|\*|`[^`]*`))?)
  | (?P<op>>=|<=|!=|<>|==|\|\||[-+*/%=<>(),;.!])
    """,
    re.VERBOSE,
)


def tokenize(sql: str) -> list[str]:
    """Lower-cased tokens; string literals kept whole; '> =' merged into '>=' as the official does."""
    tokens: list[str] = []
    pos = 0
    while pos < len(sql):
        match = _TOKEN.match(sql, pos)
        if match is None:
            raise SqlParseError(f"unexpected character {sql[pos]!r} at {pos} in: {sql}")
        pos = match.end()
        kind, text = match.lastgroup, match.group()
        if kind == "space":
            continue
        if kind == "string":
            tokens.append(text)
        elif kind == "name":
            tokens.append(re.sub(r"\s+", "", text).lower())
        elif kind == "quoted":
            tokens.append(text[1:-1].lower())
        elif text == "=" and tokens and tokens[-1] in ("!", ">", "<"):
            tokens[-1] += "="
        else:
            tokens.append({"<>": "!=", "==": "="}.get(text, text))
    return tokens


# ---------------------------------------------------------------- parser

def _empty_sql() -> dict:
    return {
        "select": (False, []),
        "from": {"table_units": [], "conds": []},
        "where": [],
        "groupBy": [],
        "having": [],
        "orderBy": [],
        "limit": None,
        "intersect": None,
        "union": None,
        "except": None,
    }


class _Parser:
    """Recursive descent over the token list, building the process_sql structure."""

    def __init__(self, tokens: list[str], text: str) -> None:
        self.toks = tokens
        self.i = 0
        self.text = text

    # -- helpers
    def peek(self, offset: int = 0) -> str | None:
        j = self.i + offset
        return self.toks[j] if j < len(self.toks) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            self.fail("unexpected end of query")
        self.i += 1
        return tok

    def accept(self, *words: str) -> bool:
        if self.peek() in words:
            self.i += 1
            return True
        return False

    def expect(self, word: str) -> None:
        if not self.accept(word):
            self.fail(f"expected {word!r}")

    def fail(self, why: str):
        raise SqlParseError(f"{why} at token {self.i} ({self.peek()!r}) in: {self.text}")

    def at_clause_end(self) -> bool:
        return self.peek() in (None, ")", ";") or self.peek() in CLAUSE_KEYWORDS

    # -- query
    def parse_query(self) -> dict:
        """select_core [INTERSECT|UNION|EXCEPT query]; a parenthesised query is unwrapped."""
        if self.peek() == "(" and self.peek(1) in ("select", "("):
            self.take()
            sql = self.parse_query()
            self.expect(")")
        else:
            sql = self.parse_core()
        op = self.peek()
        if op in SQL_OPS:
            self.take()
            self.accept("all")
            sql[op] = self.parse_query()
        return sql

    def parse_core(self) -> dict:
        sql = _empty_sql()
        self.expect("select")
        distinct = self.accept("distinct")
        self.accept("all")
        sql["select"] = (distinct, self.parse_select_list())
        if self.accept("from"):
            sql["from"] = self.parse_from()
        if self.accept("where"):
            sql["where"] = self.parse_condition()
        if self.accept("group"):
            self.expect("by")
            sql["groupBy"] = self.parse_group_by()
        if self.accept("having"):
            sql["having"] = self.parse_condition()
        if self.accept("order"):
            self.expect("by")
            sql["orderBy"] = self.parse_order_by()
        if self.accept("limit"):
            sql["limit"] = self.parse_limit()
        return sql

    def parse_select_list(self) -> list:
        items = []
        while not self.at_clause_end():
            agg = 0
            if self.peek() in AGG_OPS and self.peek(1) == "(":
                agg = AGG_OPS.index(self.take())
            items.append((agg, self.parse_val_unit()))
            self.skip_extra_operands()
            self.skip_alias()
            if not self.accept(","):
                break
        if not items:
            self.fail("empty select list")
        return items

    def skip_extra_operands(self) -> None:
        """`max(a) - min(a)` style items: the official keeps one val unit per item; skip the rest."""
        while self.peek() in UNIT_OPS[1:] or self.peek() in ("||", "%"):
            self.take()
            if self.peek() in AGG_OPS and self.peek(1) == "(":
                self.take()
            self.parse_val_unit()

    def skip_alias(self) -> None:
        if self.accept("as"):
            self.take()

    # -- from
    def parse_from(self) -> dict:
        table_units: list = []
        conds: list = []
        while True:
            table_units.append(self.parse_table_unit())
            if self.accept("on"):
                these = self.parse_condition()
                if conds:
                    conds.append("and")
                conds.extend(these)
            if self.accept(","):
                continue
            if self.peek() in JOIN_WORDS:
                while self.accept(*JOIN_WORDS[1:]):
                    pass
                self.expect("join")
                continue
            return {"table_units": table_units, "conds": conds}

    def parse_table_unit(self) -> tuple:
        if self.peek() == "(":
            self.take()
            unit = ("sql", self.parse_query())
            self.expect(")")
        else:
            name = self.take()
            if not re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
                self.fail("expected a table name")
            unit = ("table_unit", name)
        if self.accept("as"):
            self.take()
        elif self.peek() not in (None, ",", ")", ";", "on") and self.peek() not in JOIN_WORDS \
                and self.peek() not in CLAUSE_KEYWORDS and re.fullmatch(r"[a-z_][a-z0-9_]*", self.peek() or ""):
            self.take()  # alias without AS
        return unit

    # -- conditions
    def parse_condition(self) -> list:
        """cond_unit (('and'|'or') cond_unit)*, with parenthesised groups flattened."""
        conds: list = []
        while True:
            conds.extend(self.parse_condition_term())
            if self.peek() in ("and", "or"):
                conds.append(self.take())
                continue
            return conds

    def parse_condition_term(self) -> list:
        start = self.i
        if self.peek() == "(" and self.peek(1) != "select":
            try:
                return [self.parse_cond_unit()]
            except SqlParseError:
                self.i = start + 1
                group = self.parse_condition()
                self.expect(")")
                return group
        return [self.parse_cond_unit()]

    def parse_cond_unit(self) -> tuple:
        not_op = self.accept("not")
        if self.peek() == "exists":
            self.take()
            return (not_op, WHERE_OPS.index("exists"), None, self.parse_value(), None)
        val_unit = self.parse_val_unit()
        if self.accept("not"):
            not_op = True
        op = self.take()
        if op not in WHERE_OPS or op == "not":
            self.fail("expected a comparison operator")
        op_id = WHERE_OPS.index(op)
        if op == "is":
            not_op = self.accept("not") or not_op
        val1 = self.parse_value()
        val2 = None
        if op == "between":
            self.expect("and")
            val2 = self.parse_value()
        return (not_op, op_id, val_unit, val1, val2)

    def parse_value(self) -> Any:
        """A subquery (dict), a string, a number, a value list, or a column unit."""
        tok = self.peek()
        if tok == "(" and self.peek(1) == "select":
            self.take()
            sql = self.parse_query()
            self.expect(")")
            return sql
        if tok == "(":
            self.take()
            values = [self.parse_value()]
            while self.accept(","):
                values.append(self.parse_value())
            self.expect(")")
            return values[0] if len(values) == 1 else values
        if tok is not None and tok[0] in "'\"":
            self.take()
            return tok
        if tok in ("-", "+") and self.peek(1) is not None and self.peek(1)[0].isdigit():
            self.take()
            return float(tok + self.take())
        if tok is not None and (tok[0].isdigit() or tok[0] == "."):
            self.take()
            return float(tok)
        if tok == "null":
            self.take()
            return tok
        return self.parse_val_unit()[1]

    # -- columns
    def parse_col_unit(self) -> tuple:
        if self.peek() == "(":
            self.take()
            unit = self.parse_col_unit()
            self.expect(")")
            return unit
        if self.peek() in AGG_OPS and self.peek(1) == "(":
            agg = AGG_OPS.index(self.take())
            self.take()
            distinct = self.accept("distinct")
            column = self.parse_column()
            while self.peek() in UNIT_OPS[1:]:  # count(a + b): one column kept
                self.take()
                self.parse_column()
            self.expect(")")
            return (agg, column, distinct)
        distinct = self.accept("distinct")
        return (0, self.parse_column(), distinct)

    def parse_column(self) -> str:
        tok = self.take()
        if tok in _NOT_COLUMNS or tok in CLAUSE_KEYWORDS:
            self.i -= 1
            self.fail("expected a column")
        return tok  # a name, `*`, or a literal where a column could stand (e.g. `SELECT 1`)

    def parse_val_unit(self) -> tuple:
        if self.peek() == "(" and self.peek(1) != "select":
            start = self.i
            self.take()
            try:
                unit = self.parse_val_unit()
                self.expect(")")
                return unit
            except SqlParseError:
                self.i = start
        unit1 = self.parse_col_unit()
        if self.peek() in UNIT_OPS[1:]:
            op = UNIT_OPS.index(self.take())
            return (op, unit1, self.parse_col_unit())
        return (0, unit1, None)

    # -- group/order/limit
    def parse_group_by(self) -> list:
        units = [self.parse_col_unit()]
        while self.accept(","):
            units.append(self.parse_col_unit())
        return units

    def parse_order_by(self) -> tuple:
        units = []
        direction = "asc"
        while True:
            units.append(self.parse_val_unit())
            if self.peek() in ("asc", "desc"):
                direction = self.take()
            if not self.accept(","):
                return (direction, units)

    def parse_limit(self) -> int:
        tok = self.take()
        if not tok.isdigit():
            self.fail("expected a number after LIMIT")
        if self.accept(","):  # LIMIT offset, count
            tok = self.take()
        elif self.accept("offset"):
            self.take()
        return int(tok)


def parse_sql(sql: str) -> dict:
    """Parse a Spider-style SELECT into the process_sql structure; raises SqlParseError."""
    parser = _Parser(tokenize(sql), sql)
    result = parser.parse_query()
    while parser.accept(";"):
        pass
    if parser.peek() is not None:
        parser.fail("unexpected text after the query")
    return result
