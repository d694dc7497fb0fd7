"""The SQL query in a model's answer, for the EX stages: chat prose, code fences and base-model continuations around it.

The scored SQL is a statement the model wrote, whole: never a sub-part of it. Where to look, best first: ```sql
blocks, other fences, inline `code`, the whole text. A SELECT or WITH starts a statement unless it continues
the one before (a subquery in its parentheses, the query after UNION, anything after a prefix that SQLite's
parser calls incomplete). A statement runs to its end: a `;`, a blank line, a fence, `###`, a `Label:` line,
the end of a sentence (all outside quotes and comments), or the next statement. Only prose is cut from its end,
where the rest is prose (words, no operators or SQL clauses) and what stays is a statement SQLite's grammar
accepts. Broken or cut-off SQL stays as written, and scores as the error it is; `> =` is left for the metric
to repair, as the official evaluator does.

The answer is the first statement that compiles against the example's database, else the first one SQLite's
grammar accepts (one not cut inside a line before one that is), else the first statement that is plainly SQL
(on a line of its own, or cut off by the token limit), else "" (no SQL).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from custom_metrics.execution_accuracy import repair_operators
from custom_metrics.safe_sqlite import OK, compile_check

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_START = re.compile(r"\b(?:SELECT|WITH)\b", re.IGNORECASE)
_CONTINUES = re.compile(r"(?:\b(?:UNION|INTERSECT|EXCEPT|ALL|AS)|\()\s*$", re.IGNORECASE)  # the next query belongs
# where a statement certainly ends, when found outside quotes and comments
_HARD_END = re.compile(
    r";"
    r"|\n[ \t]*\n"  # a blank line
    r"|```|###"
    r"|\n[ \t]*[A-Za-z][A-Za-z0-9_]*[ \t]*:(?!:)"  # a "Question:", "A:", "Explanation:" line
    r"|\n[ \t]*(?i:Explanation|Note|This query|The query|This SQL|The SQL)\b"
    r"|\.[ \t]+(?=[A-Z][a-z])"  # the end of a sentence
)
_QUOTES = "'\"`["
_CLOSING = {"'": "'", '"': '"', "`": "`", "[": "]"}
_PROSE_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?[,.!?:]?")
_NOT_PROSE = re.compile(r"[=<>*()\[\];|%+/]|\w\.\w|--")  # operators, calls, qualified names: still SQL
_SQL_WORDS = frozenset("""
    select from where and or not order group by having limit offset join inner left right outer cross natural on
    using as union intersect except all distinct with in like glob between is null asc desc case when then else end
    exists values count sum avg min max
""".split())


@dataclass(frozen=True)
class Extraction:
    """The statement taken from an answer ("" when it has none), and whether trailing prose was cut from it."""

    sql: str
    cut: bool = False


def extract_sql(text: str, db_path: str | Path | None = None) -> str:
    """The SQL query of a model's answer, on one line ("" when there is none); see the module docstring."""
    return extract(text, db_path).sql


def extract(text: str, db_path: str | Path | None = None) -> Extraction:
    """The statement of a model's answer and whether prose was cut from its end; see the module docstring."""
    statements = [(_readings(span), plainly_sql) for span, plainly_sql in _spans(text)]
    if db_path is not None:
        for readings, _ in statements:
            for sql, cut, _ in readings:
                if compile_check(repair_operators(sql), db_path).error == OK:
                    return Extraction(one_line(sql), cut)
    for allow_inline_cut in (False, True):
        for readings, _ in statements:
            for sql, cut, inline in readings:
                if (allow_inline_cut or not inline) and _grammar(sql) == "complete":
                    return Extraction(one_line(sql), cut)
    for readings, plainly_sql in statements:
        if plainly_sql:
            sql, cut, _ = readings[-1]  # as written, less trailing lines of prose
            return Extraction(one_line(sql), cut)
    return Extraction("")


def one_line(sql: str) -> str:
    """The statement on one line: comments dropped, whitespace outside quotes collapsed, no trailing `;`."""
    parts, i = [], 0
    while i < len(sql):
        end = _skip_quoted_or_comment(sql, i)
        if end > i and not sql.startswith(("--", "/*"), i):
            parts.append(sql[i:end])  # a quoted value or name, kept as written
        elif end > i or sql[i].isspace():
            if parts and parts[-1] != " ":
                parts.append(" ")
        else:
            parts.append(sql[i])
        i = max(end, i + 1)
    return "".join(parts).strip().rstrip(";").strip()


def _regions(text: str) -> list[str]:
    """Where to look, best first: ```sql blocks, other fenced blocks, inline code, the whole text."""
    fenced = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    return ([body for lang, body in fenced if lang == "sql"] + [body for lang, body in fenced if lang != "sql"]
            + _INLINE.findall(text) + [text])


def _spans(text: str) -> Iterator[tuple[str, bool]]:
    """Every statement's text, region by region, and whether it is plainly SQL: on a line of its own, or cut short
    (more text would finish it)."""
    seen = set()
    for region in _regions(text):
        for start, span in _region_spans(region):
            if span not in seen:
                seen.add(span)
                at_line_start = not region[:start].rpartition("\n")[2].strip()
                yield span, at_line_start or _grammar(span) == "incomplete"


def _region_spans(region: str) -> list[tuple[int, str]]:
    """(start, text) of the statements of one region: a start inside a statement begins another one only where
    the statement before it is over (complete, or broken there)."""
    spans: list[list[int]] = []  # [start, end] of each statement
    for match in _START.finditer(region):
        p = match.start()
        if spans and p < spans[-1][1]:
            head = region[spans[-1][0]:p]
            if _continued(head):
                continue
            spans[-1][1] = p
        spans.append([p, p + _hard_end(region[p:])])
    return [(start, region[start:end].rstrip()) for start, end in spans]


def _continued(head: str) -> bool:
    """Whether a start keyword after head belongs to head's statement: inside its parentheses or one of its
    quotes, after UNION/INTERSECT/EXCEPT, or after a prefix SQLite's parser calls incomplete."""
    depth, i = 0, 0
    while i < len(head):
        end = _skip_quoted_or_comment(head, i)
        if end >= len(head) > i and not head.startswith("--", i):
            # open to the end: a quote of the statement, unless what comes before it is no SQL ("the singer's")
            return _grammar(repair_operators(head[:i]).rstrip()) != "broken"
        if end > i:
            i = end
            continue
        depth += {"(": 1, ")": -1}.get(head[i], 0)
        i += 1
    return depth > 0 or bool(_CONTINUES.search(head)) or _grammar(head.rstrip()) == "incomplete"


def _readings(span: str) -> list[tuple[str, bool, bool]]:
    """The readings of one statement, best first: (sql, prose cut, cut inside a line). The statement itself when
    SQLite's grammar accepts it; else each shorter one it accepts whose rest is prose, latest cut first; last, the
    statement as written less its trailing lines of prose."""
    if _grammar(span) == "complete":
        return [(span, False, False)]
    cuts = _prose_cuts(span)
    readings = [(span[:c].rstrip(), True, inline) for c, inline in cuts if _grammar(span[:c].rstrip()) == "complete"]
    whole_lines = [c for c, inline in cuts if not inline]
    as_written = span[:min(whole_lines)].rstrip() if whole_lines else span
    return readings + [(as_written, as_written != span, False)]


def _prose_cuts(span: str) -> list[tuple[int, bool]]:
    """(position, inside a line) where the rest of the span is prose, latest first; never at the start."""
    cuts, offset = [], 0
    for number, line in enumerate(span.split("\n")):
        if number:
            cuts.append((offset, False))
        cuts.extend((offset + end, True) for end in _word_ends(line))
        offset += len(line) + 1
    return sorted(((c, inline) for c, inline in cuts if c > 0 and _is_prose(span[c:])), reverse=True)


def _is_prose(rest: str) -> bool:
    """Whether text is prose rather than SQL: words only, no operators, and not a clause of SQL words."""
    words = rest.split()
    if not words or _NOT_PROSE.search(rest) or not all(_PROSE_WORD.fullmatch(w) for w in words):
        return False
    plain = [w for w in words if w.strip(",.!?:").lower() not in _SQL_WORDS]
    first = words[0].strip(",.!?:")
    if first.lower() in _SQL_WORDS:
        return len(plain) >= 3  # "where the singers are listed", not "FROM singer AS s"
    return len(plain) >= 2 or first[:1].isupper()


def _grammar(sql: str) -> str:
    """'complete', 'incomplete' (more text could finish it) or 'broken', by SQLite's parser alone (after the
    metric's repair of `> =`, `< =`, `! =`)."""
    result = compile_check(repair_operators(sql))
    if result.error == OK:
        return "complete"
    return "incomplete" if "incomplete input" in result.message else "broken"


def _word_ends(line: str) -> list[int]:
    """Positions after each word of a line outside quotes (the whole line excluded)."""
    ends, quote = [], None
    for i, char in enumerate(line):
        if quote:
            if char == _CLOSING[quote]:
                quote = None
        elif char in _QUOTES:
            quote = char
        elif char.isspace() and i and not line[i - 1].isspace():
            ends.append(i)
    return ends


def _hard_end(sql: str) -> int:
    """Index of the first hard end (see _HARD_END) outside quoted strings, identifiers and comments, or the end."""
    i = 0
    while i < len(sql):
        end = _skip_quoted_or_comment(sql, i)
        if end > i:
            i = end
        elif _HARD_END.match(sql, i):
            return i
        else:
            i += 1
    return len(sql)


def _skip_quoted_or_comment(sql: str, i: int) -> int:
    """The index after the quoted string, quoted identifier or comment that starts at i (i itself when none does)."""
    char = sql[i]
    if char in _QUOTES:
        close = sql.find(_CLOSING[char], i + 1)
        return len(sql) if close < 0 else close + 1
    if sql.startswith("--", i):
        newline = sql.find("\n", i)
        return len(sql) if newline < 0 else newline
    if sql.startswith("/*", i):
        close = sql.find("*/", i + 2)
        return len(sql) if close < 0 else close + 2
    return i
