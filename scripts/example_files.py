"""Example files, Spider's and the user's: a JSON list or JSON lines of {question, query, db_id}, every entry checked.

A file is read once per version (its size and mtime); an error is a UserError naming the file and the place
("entry 3" of a list, "line 4" of JSON lines, both counted from 1), ending in the `fix` advice its caller gives.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from custom_metrics.execution_accuracy import is_plain_name
from scripts.errors import UserError

REQUIRED_FIELDS = ("question", "query", "db_id")


def read_examples(path: Path, fix: str) -> list[dict]:
    """The examples of one file (a JSON list, or JSON lines), each checked for question/query/db_id."""
    return read_examples_and_places(path, fix)[0]


def read_examples_and_places(path: Path, fix: str) -> tuple[list[dict], tuple[str, ...]]:
    """read_examples, and where each example is in the file ("entry 3" of a list, "line 4" of JSON lines)."""
    stat = path.stat()
    return _read_examples_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, fix)


@lru_cache(maxsize=8)
def _read_examples_cached(path: str, size: int, mtime_ns: int, fix: str) -> tuple[list[dict], tuple[str, ...]]:
    """read_examples_and_places, keyed on the file's size and mtime so that an edited file is read again."""
    text = _read_text(Path(path), fix)
    if text.lstrip().startswith("["):
        data = _parse_json(Path(path), text, fix)
        count = len(data) if isinstance(data, list) else 0
        places = tuple(f"entry {n}" for n in range(1, count + 1))  # counted from 1, as lines are
    else:  # JSON lines: an entry is named by its line
        _refuse_wrapping_object(Path(path), text, fix)
        data = _parse_json_lines(Path(path), text, fix)
        places = tuple(f"line {n}" for n, line in enumerate(text.splitlines(), 1) if line.strip())
    if not isinstance(data, list):
        raise UserError(f"{path} should hold a JSON list of examples, found {type(data).__name__}; {fix}")
    for place, entry in zip(places, data):
        lacking = [k for k in REQUIRED_FIELDS
                   if not isinstance(entry, dict) or not isinstance(entry.get(k), str) or not entry[k].strip()]
        if lacking:
            raise UserError(f"{path}: {place} lacks {', '.join(lacking)} (each example needs question, query and "
                            "db_id as non-empty strings; other fields are ignored); fix or remove that entry")
        if not is_plain_name(entry["db_id"]):
            raise UserError(f"{path}: {place} has db_id {entry['db_id']!r}, not a plain name: a db_id names "
                            "<db_id>/<db_id>.sqlite or <db_id>.sqlite in the databases folder, without '/', '\\' "
                            "or '..'; fix that entry")
    return data, places


def _refuse_wrapping_object(path: Path, text: str, fix: str) -> None:
    """A file that is one JSON object but not an example (such as {"data": [...]}) is a UserError naming its lists."""
    if not text.lstrip().startswith("{"):
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return  # several values (JSON lines) or malformed: read line by line
    if isinstance(value, dict) and not any(k in value for k in REQUIRED_FIELDS):  # else: JSON lines of one example
        raise UserError(f"{path}: a JSON object, not a list of examples; {_object_advice(value)} ({fix})")


def _object_advice(value: dict) -> str:
    """What to do with a JSON object that holds the examples: which of its keys hold lists, or what keys it has."""
    lists = sorted(((k, len(v)) for k, v in value.items() if isinstance(v, list)), key=lambda kv: -kv[1])
    if len(lists) == 1:
        return f"its key {lists[0][0]!r} holds a list of {lists[0][1]}: put that list at the top level"
    if lists:
        named = ", ".join(f"{k!r} ({n})" for k, n in lists)
        return f"its keys {named} hold lists: put the list of examples at the top level"
    keys = ", ".join(repr(k) for k in list(value)[:5]) or "none"
    return (f"it holds no list (keys: {keys}); give a JSON list, or JSON lines, of "
            "{\"question\", \"query\", \"db_id\"} objects")


def _parse_json_lines(path: Path, text: str, fix: str) -> list:
    """One JSON value per non-blank line."""
    data = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n} is not valid JSON ({e.msg}, column {e.colno}); the file should be a JSON "
                            f"list, or JSON lines with one example object per line; {fix}") from None
    return data


def read_json(path: Path, fix: str):
    """A JSON file; malformed JSON is a UserError naming the file, line and column."""
    return _parse_json(path, _read_text(path, fix), fix)


def _read_text(path: Path, fix: str) -> str:
    """A UTF-8 text file, with or without a byte-order mark; anything else is a UserError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 ({fix})") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None


def _parse_json(path: Path, text: str, fix: str):
    """JSON text of a file; malformed JSON is a UserError naming the file, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                        f"fix the file ({fix})") from None
