"""The SQL query in a model's answer, for the EX stages: chat prose, code fences and base-model continuations around it.

Every SELECT/WITH (in ```sql blocks first, then other fences, inline `code`, then the whole text) starts a
candidate. A candidate runs to its statement's end: a `;`, a blank line, a fence, `###`, a `Label:` line or the
end of a sentence (all outside quotes and comments), or the first line that SQLite's parser says does not
continue the statement (`SELECT ... FROM t` followed by `Question: ...` or by the next query); within that line
the longest part that completes the statement is kept. The answer is the first candidate that compiles against
the example's database, else the first one SQLite's grammar accepts (one that ends on a line boundary before
one cut inside a line), else the first candidate as written, which then scores as the error it is.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from custom_metrics.safe_sqlite import OK, compile_check

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_START = re.compile(r"\b(?:SELECT|WITH)\b", re.IGNORECASE)
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


def extract_sql(text: str, db_path: str | Path | None = None) -> str:
    """The first SQL query in a model's answer, on one line ("" when there is none); see the module docstring."""
    candidates = list(_candidates(text))
    if db_path is not None:
        for sql, _ in candidates:
            if compile_check(sql, db_path).error == OK:
                return one_line(sql)
    for cut_inside_line in (False, True):
        for sql, cut in candidates:
            if cut == cut_inside_line:
                return one_line(sql)
    return _last_resort(text)


def _last_resort(text: str) -> str:
    """When nothing compiles: the first statement cut short (e.g. by the token limit) or set on a line of its own,
    as written, so that it scores as the syntax error it is; "" when every start is a word of prose."""
    for region in _regions(text):
        for match in _START.finditer(region):
            span = _span(region, match.start()).rstrip()
            at_line_start = not region[: match.start()].rpartition("\n")[2].strip()
            if at_line_start or _grammar(span) == "incomplete":
                return one_line(span)
    return ""


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


def _candidates(text: str) -> Iterator[tuple[str, bool]]:
    """(statement, whether it was cut inside a line) for every start, each a statement SQLite's grammar accepts."""
    seen = set()
    for region in _regions(text):
        for match in _START.finditer(region):
            for found in _statements(_span(region, match.start())):
                if found[0] not in seen:
                    seen.add(found[0])
                    yield found


def _span(region: str, start: int) -> str:
    """From a start keyword up to the first hard end outside quotes and comments."""
    body = region[start:]
    return body[: _hard_end(body)]


def _statements(span: str) -> list[tuple[str, bool]]:
    """Complete statements at the start of a span, longest first, growing line by line while the parser agrees.

    At the first line that does not continue the statement, its longest part that completes it (cut inside the
    line) comes first, then the statement as it stood at the line before (if complete); prose read as SQL, such
    as `WHERE the`, fails against the database and leaves the line-boundary one.
    """
    lines = span.split("\n")
    complete: list[tuple[str, bool]] = []
    for n in range(1, len(lines) + 1):
        text = "\n".join(lines[:n]).rstrip()
        state = _grammar(text)
        if state == "complete":
            complete = [(text, False)]
        elif state == "broken":
            head = "\n".join(lines[: n - 1])
            for cut in _word_ends(lines[n - 1]):
                shorter = ((head + "\n" if head else "") + lines[n - 1][:cut]).rstrip()
                if _grammar(shorter) == "complete":
                    if complete and len(lines[n - 1][:cut].split()) == 1:
                        break  # one word after a complete statement is prose read as an alias ("... FROM t This")
                    return [(shorter, True)] + complete
            return complete
    return complete


def _grammar(sql: str) -> str:
    """'complete', 'incomplete' (more text could finish it) or 'broken', by SQLite's parser alone."""
    result = compile_check(sql)
    if result.error == OK:
        return "complete"
    return "incomplete" if "incomplete input" in result.message else "broken"


def _word_ends(line: str) -> list[int]:
    """Positions after each word of a line outside quotes, longest first (the whole line excluded)."""
    ends, quote = [], None
    for i, char in enumerate(line):
        if quote:
            if char == _CLOSING[quote]:
                quote = None
        elif char in _QUOTES:
            quote = char
        elif char.isspace() and i and not line[i - 1].isspace():
            ends.append(i)
    return ends[::-1]


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
