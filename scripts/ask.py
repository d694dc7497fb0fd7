"""Asking the exported model: a question about an SQLite database in, its SQL and the first rows of its result out.

    python -m scripts.ask "How many books are there?" --db library.sqlite
    python -m scripts.ask --questions questions.txt --db library.sqlite --json      # one question per line
    python -m scripts.ask "..." --db library.sqlite --num-candidates 8              # execution-guided voting

The model is RESULTS_DIR/export (the export stage; or --model DIR). The prompt is the training prompt, built from
the database's own schema (scripts/prompts.py render, scripts/databases.py schema_text, with the run's
SCHEMA_SAMPLE_ROWS from the folder's text2sql.json); the SQL is generated greedily (scripts/generation.py) or voted
on (scripts/voting.py), extracted (scripts/sql_extraction.py) and run read-only with the metric's time limit
(custom_metrics/safe_sqlite.py): the database is never changed. Bad input (no export, a file that is not an SQLite
database, an empty question, a missing questions file) is one line on stderr and exit status 2; an answer whose SQL
is missing or fails gives exit status 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scripts.errors import UserError
from scripts.export import EXPORT_DIR_NAME, SETTINGS_NAME

log = logging.getLogger("ask")

DEFAULTS = {"schema_sample_rows": 0, "max_new_tokens": 160, "sql_timeout_s": 30.0, "vote_temperature": 0.7,
            "vote_top_p": 0.95, "seed": 0}  # main.py's, for a folder without text2sql.json
MAX_CELL_CHARS = 40  # a longer value is cut in the table (--json gives it whole)
MAKE_EXPORT = ("run `python main.py` (every stage, export last), or `python main.py --stages export` after a run "
               "that trained, or pass --model DIR")


@dataclass
class Answer:
    """One question's answer: the model's text, the SQL taken from it, and what running it gave."""

    question: str
    raw_output: str
    sql: str
    error: str = "ok"  # the safe executor's error class, or "no_sql"
    message: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    row_count: int = 0
    voting: dict | None = None

    @property
    def ok(self) -> bool:
        """Whether the SQL ran."""
        return self.error == "ok"


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag as one line and exit status 2 (the UserError convention)."""

    def error(self, message: str):
        raise UserError(f"{message} (python -m scripts.ask --help)")


def build_parser() -> argparse.ArgumentParser:
    """The flags."""
    p = _Parser(prog="python -m scripts.ask", description="Answer questions about an SQLite database with the "
                "exported Text-to-SQL model: its SQL, run read-only, and the first rows of the result.")
    p.add_argument("question", nargs="?", help="the question (or --questions FILE)")
    p.add_argument("--db", required=True, type=Path, help="the SQLite database the question is about (read only)")
    p.add_argument("--questions", type=Path, help="a text file of questions, one a line (blank lines skipped)")
    p.add_argument("--model", type=Path, help="the model folder (default: RESULTS_DIR/export, RESULTS_DIR from the "
                   "environment or .env, else results)")
    p.add_argument("--num-candidates", type=int, default=0, help="execution-guided voting over this many sampled "
                   "candidates and the greedy answer (0 or 1: greedy alone; default: 0)")
    p.add_argument("--max-rows", type=int, default=10, help="rows of each result shown (default: 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per question, a line each")
    p.add_argument("--batch-size", type=int, default=16, help="questions generated together (default: 16)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when every answer's SQL ran, 1 when one had none or failed, 2 on bad input (one line)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        questions = read_questions(args.question, args.questions)
        check_numbers(args)
        check_database(args.db)
        folder = args.model or default_model_dir()
        check_export(folder, given=args.model is not None)
        answers = ask(folder, args.db, questions, args.num_candidates, args.batch_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for answer in answers:
        print(json.dumps(answer_json(answer, args.max_rows)) if args.json else answer_text(answer, args.max_rows))
    return 0 if all(a.ok for a in answers) else 1


# ---------------------------------------------------------------------------------------------------------------
# Input checks (before the model loads)
# ---------------------------------------------------------------------------------------------------------------

def read_questions(question: str | None, questions_file: Path | None) -> list[str]:
    """The question, or the questions of the file (one a line); none, both or an empty one is a UserError."""
    if question is not None and questions_file is not None:
        raise UserError("give a question or --questions FILE, not both")
    if questions_file is not None:
        if not questions_file.is_file():
            what = "is a folder" if questions_file.is_dir() else "not found"
            raise UserError(f"--questions {questions_file}: {what}; give a text file with one question a line")
        try:
            lines = questions_file.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--questions {questions_file} cannot be read as UTF-8 text ({e})") from None
        found = [line.strip() for line in lines if line.strip()]
        if not found:
            raise UserError(f"--questions {questions_file} holds no question (every line is blank)")
        return found
    if question is None:
        raise UserError('no question: give one (python -m scripts.ask "How many ...?" --db DB.sqlite) or '
                        "--questions FILE")
    if not question.strip():
        raise UserError("the question is empty: ask something, e.g. \"How many rows does each table have?\"")
    return [question.strip()]


def check_numbers(args: argparse.Namespace) -> None:
    """--num-candidates >= 0, --max-rows >= 0, --batch-size > 0."""
    if args.num_candidates < 0 or args.max_rows < 0 or args.batch_size <= 0:
        raise UserError("--num-candidates and --max-rows must be >= 0 and --batch-size > 0")


def check_database(path: Path) -> None:
    """The database is a readable SQLite file."""
    from scripts.databases import SQLITE_HEADER

    if path.is_dir():
        raise UserError(f"--db {path} is a folder; give the .sqlite file itself")
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        raise UserError(f"--db {path}: no such file; give the path of an SQLite database") from None
    except OSError as e:
        raise UserError(f"--db {path} cannot be read ({e.strerror or e}); give this user read permission") from None
    if header != SQLITE_HEADER:
        raise UserError(f"--db {path} is not an SQLite database (no SQLite header: empty, another format or a "
                        "git-LFS pointer); give an SQLite file")


def default_model_dir() -> Path:
    """RESULTS_DIR/export, RESULTS_DIR from the environment, else .env, else results."""
    from dotenv import dotenv_values

    results = os.environ.get("RESULTS_DIR") or (dotenv_values(".env").get("RESULTS_DIR") if Path(".env").is_file()
                                                else None)
    return Path(results or "results") / EXPORT_DIR_NAME


def check_export(folder: Path, given: bool) -> None:
    """A model folder: config.json, weights and tokenizer files; without one, say how to make the export."""
    from scripts.model_source import TOKENIZER_FILES, WEIGHT_PATTERNS

    where = f"--model {folder}" if given else f"no exported model at {folder}"
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}{' holds no model (no config.json)' if given else ''}: {MAKE_EXPORT}")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"{folder} has config.json but no weights (*.safetensors); {MAKE_EXPORT}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); {MAKE_EXPORT}")


# ---------------------------------------------------------------------------------------------------------------
# Answering
# ---------------------------------------------------------------------------------------------------------------

def folder_settings(folder: Path) -> dict:
    """The run's prompt and SQL settings (the export's text2sql.json), main.py's defaults for what it lacks."""
    path = folder / SETTINGS_NAME
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {name: saved.get(name, default) for name, default in DEFAULTS.items()}


def ask(folder: Path, db: Path, questions: list[str], num_candidates: int = 0, batch_size: int = 16) -> list[Answer]:
    """Load the model, generate (greedy, or voted over sampled candidates), extract and run each question's SQL."""
    from scripts.cpu_threads import set_cpu_threads
    from scripts.databases import schema_text
    from scripts.generation import Sampling, generate
    from scripts.models import load_model_and_tokenizer
    from scripts.prompts import render

    settings = folder_settings(folder)
    schema = schema_text(db, settings["schema_sample_rows"])
    set_cpu_threads()
    model, tokenizer = load_model_and_tokenizer(str(folder), quantization="none")  # the export's own precision
    prompts = [render(tokenizer, schema, question)[0] for question in questions]
    options = {"batch_size": batch_size, "max_new_tokens": settings["max_new_tokens"]}
    texts = generate(model, tokenizer, prompts, **options)
    sqls = [extracted(text, db) for text in texts]
    votes = [None] * len(questions)
    if num_candidates >= 2:
        sampling = Sampling(n=num_candidates, temperature=settings["vote_temperature"],
                            top_p=settings["vote_top_p"], seed=settings["seed"])
        candidates = generate(model, tokenizer, prompts, sampling=sampling, **options)
        votes = [voted(sql, group, db, settings["sql_timeout_s"]) for sql, group in zip(sqls, candidates)]
        sqls = [v["sql"] for v in votes]
    return [run_answer(q, text, sql, db, settings["sql_timeout_s"], v)
            for q, text, sql, v in zip(questions, texts, sqls, votes)]


def extracted(text: str, db: Path) -> str:
    """The SQL statement of an answer text ("" when it has none)."""
    from scripts.sql_extraction import extract

    return extract(text or "", db).sql


def voted(greedy_sql: str, candidate_texts: list[str], db: Path, timeout: float) -> dict:
    """The vote over the greedy answer and the candidates: the chosen SQL and how many agreed."""
    from scripts.voting import vote

    result = vote(greedy_sql, [extracted(text, db) for text in candidate_texts], db, timeout)
    return {"sql": result.sql, "candidates": len(candidate_texts), "votes": result.votes, "voters": result.voters,
            "changed": result.changed}


def run_answer(question: str, text: str, sql: str, db: Path, timeout: float, voting: dict | None) -> Answer:
    """Run the SQL read-only, within the time limit; the answer with its columns and rows, or its error."""
    from custom_metrics.execution_accuracy import repair_operators
    from custom_metrics.safe_sqlite import run_query

    answer = Answer(question, text, sql, voting=voting)
    if not sql:
        answer.error, answer.message = "no_sql", "the model's answer holds no SQL query"
        return answer
    sql = repair_operators(sql)  # `> =` -> `>=`, as the metric repairs it
    result = run_query(db, sql, timeout)
    if not result.ok:
        answer.error, answer.message = result.error, result.message
        return answer
    answer.rows, answer.row_count, answer.columns = result.rows, len(result.rows), list(result.columns)
    return answer


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

def _cell(value) -> str:
    """A value as the table shows it (NULL, blobs in hex, long text cut)."""
    if value is None:
        return "NULL"
    text = "x'" + value.hex() + "'" if isinstance(value, bytes) else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 3] + "..."


def table(columns: list[str], rows: list[tuple]) -> str:
    """Rows as a plain text table under their column names."""
    width = len(rows[0]) if rows else len(columns)
    names = columns if len(columns) == width else [f"column {i + 1}" for i in range(width)]
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(names[i])] + [len(row[i]) for row in cells]) for i in range(width)]
    lines = [" | ".join(n.ljust(w) for n, w in zip(names, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def answer_text(answer: Answer, max_rows: int) -> str:
    """The question, its SQL and the first rows (or why there are none), for a person."""
    lines = [f"Q: {answer.question}", f"SQL: {answer.sql or '(none)'}"]
    if answer.voting:
        v = answer.voting
        lines.append(f"vote: {v['votes']} of {v['voters']} answers that ran agree ({v['candidates']} candidates"
                     + (", the greedy answer outvoted)" if v["changed"] else ")"))
    if not answer.ok:
        what = answer.message.splitlines()[0] if answer.message else answer.error
        lines.append(f"error: {answer.error}: {what}" if answer.message else f"error: {answer.error}")
        if answer.error == "no_sql":
            lines.append(f"model answer: {answer.raw_output.strip()[:200]!r}")
        return "\n".join(lines) + "\n"
    shown = answer.rows[:max_rows]
    if answer.columns or shown:
        lines.append(table(answer.columns, shown))
    count = f"{answer.row_count} row{'s' * (answer.row_count != 1)}"
    lines.append(count + (f", the first {len(shown)} shown" if len(shown) < answer.row_count else ""))
    return "\n".join(lines) + "\n"


def _json_value(value):
    """A result value as JSON (blobs as hex text)."""
    return "x'" + value.hex() + "'" if isinstance(value, bytes) else value


def answer_json(answer: Answer, max_rows: int) -> dict:
    """The answer for a program: question, SQL, ok, error, columns, the first rows, the row count, the vote."""
    return {"question": answer.question, "sql": answer.sql, "ok": answer.ok, "error": answer.error,
            "message": answer.message, "columns": answer.columns,
            "rows": [[_json_value(v) for v in row] for row in answer.rows[:max_rows]],
            "row_count": answer.row_count, "truncated": answer.row_count > max_rows, "voting": answer.voting,
            "raw_output": answer.raw_output}


if __name__ == "__main__":
    sys.exit(main())
