"""MMLU questions: the original CSV layout or the Hub's cais/mmlu, every row checked, sampled per subject."""
from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from scripts.errors import UserError

LETTERS = ("A", "B", "C", "D")
CSV_SPLITS = {"dev": "dev", "val": "val", "validation": "val", "test": "test"}
HUB_SPLITS = {"dev": "dev", "val": "validation", "validation": "validation", "test": "test"}
HUB_DATASET = "cais/mmlu"


def load_mmlu(
    path: Path | str | None,
    split: str = "test",
    subjects: Sequence[str] | None = None,
    per_subject: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """MMLU questions (`subject`, `index`, `question`, `choices`, `answer`), by subject then file order."""
    if split not in CSV_SPLITS:
        raise UserError(f"MMLU split {split!r} is unknown; use one of {sorted(CSV_SPLITS)}")
    questions = load_hub_split(split) if path is None else load_csv_split(Path(path), split)
    if subjects is not None:
        questions = _only_subjects(questions, subjects, path)
    if per_subject is not None:
        questions = sample_per_subject(questions, per_subject, seed)
    return questions


def load_csv_split(root: Path, split: str) -> list[dict]:
    """Every `<subject>_<split>.csv` of `<root>/<split>/` (no header; question, A, B, C, D, answer letter)."""
    folder = root / CSV_SPLITS[split]
    if not root.is_dir():
        raise UserError(f"PATH_MMLU: folder {root} not found; point PATH_MMLU (or --mmlu) at the MMLU data folder "
                        "that holds dev/, val/ and test/")
    if not folder.is_dir():
        raise UserError(f"PATH_MMLU: {folder} is missing; the MMLU folder must hold dev/, val/ and test/ "
                        "with one <subject>_<split>.csv per subject")
    suffix = f"_{CSV_SPLITS[split]}.csv"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(suffix))
    if not files:
        raise UserError(f"PATH_MMLU: no *{suffix} files in {folder}; expected the original MMLU CSV layout")
    questions = []
    for file in files:
        questions.extend(read_subject_csv(file, file.name[: -len(suffix)]))
    return questions


def read_subject_csv(file: Path, subject: str) -> list[dict]:
    """One subject's questions from its CSV; a malformed row raises UserError naming file and line."""
    questions = []
    try:
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as e:
        raise UserError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
                        "(the original MMLU CSVs are)") from None
    except csv.Error as e:
        raise UserError(f"{file} is not a readable CSV file ({e}); fix it or get a fresh copy of MMLU") from None
    for line_num, row in rows:
        if len(row) != 6:
            raise UserError(f"{file}:{line_num}: expected 6 columns (question, A, B, C, D, answer), "
                            f"found {len(row)}; fix or remove that row")
        answer = row[5].strip().upper()
        if answer not in LETTERS:
            raise UserError(f"{file}:{line_num}: answer {row[5]!r} is not one of A, B, C, D; fix that row")
        questions.append(
            {"subject": subject, "index": len(questions), "question": row[0], "choices": row[1:5], "answer": answer}
        )
    return questions


def load_hub_split(split: str) -> list[dict]:
    """The Hub's cais/mmlu ("all" config) in the same row format; needs network access to the Hub."""
    try:
        from datasets import load_dataset

        dataset = load_dataset(HUB_DATASET, "all", split=HUB_SPLITS[split])
    except Exception as e:  # any failure here means the Hub copy is unusable; the fix is the same
        raise UserError(f"PATH_MMLU is not set and {HUB_DATASET} could not be loaded from the Hub "
                        f"({type(e).__name__}); set PATH_MMLU (or --mmlu) to a folder in the original MMLU CSV "
                        "layout (dev/, val/, test/)") from e
    counters: dict[str, int] = defaultdict(int)
    questions = []
    for row in dataset:
        subject = row["subject"]
        questions.append({"subject": subject, "index": counters[subject], "question": row["question"],
                          "choices": list(row["choices"]), "answer": LETTERS[row["answer"]]})
        counters[subject] += 1
    return sorted(questions, key=lambda q: (q["subject"], q["index"]))


def check_hub_copy(token: str | None = None) -> None:
    """PATH_MMLU unset: cais/mmlu must be in the local datasets cache (offline) or the Hub answer one quick probe."""
    from datasets import config
    from huggingface_hub import errors as hub

    from scripts.model_source import hub_endpoint, hub_unreachable

    fix = "pass --mmlu DIR (or PATH_MMLU in .env), a folder in MMLU's original CSV layout (dev/, val/, test/)"
    cached = _in_datasets_cache(Path(config.HF_DATASETS_CACHE))
    if config.HF_HUB_OFFLINE:
        if not cached:
            raise UserError(f"PATH_MMLU is not set, so MMLU comes from the Hub's {HUB_DATASET}, but HF_HUB_OFFLINE=1 "
                            f"is set and it is not in the local datasets cache ({config.HF_DATASETS_CACHE}): {fix}, "
                            "or go online (unset HF_HUB_OFFLINE) to download it once")
        return
    try:
        unreachable = hub_unreachable(HUB_DATASET, token, repo_type="dataset")
    except (hub.RepositoryNotFoundError, hub.HFValidationError):
        raise UserError(f"PATH_MMLU is not set and {HUB_DATASET} was not found on the Hub ({hub_endpoint()}): "
                        f"{fix}") from None
    if unreachable and cached:
        raise UserError(f"PATH_MMLU is not set and the Hugging Face Hub ({hub_endpoint()}) cannot be reached "
                        f"({unreachable}); {HUB_DATASET} is in the local datasets cache: set HF_HUB_OFFLINE=1 to use "
                        f"it without the Hub, or {fix}")
    if unreachable:
        raise UserError(f"PATH_MMLU is not set and the Hugging Face Hub ({hub_endpoint()}) cannot be reached "
                        f"({unreachable}) to download {HUB_DATASET}: {fix}, or go online")


def _in_datasets_cache(cache: Path) -> bool:
    """Whether the datasets library's own cache holds cais/mmlu's "all" configuration (what it reads offline)."""
    owner, name = HUB_DATASET.split("/")
    return any(p.is_dir() for p in (cache / f"{owner}___{name}" / "all").glob("*/*"))


def _only_subjects(questions: list[dict], subjects: Sequence[str], path) -> list[dict]:
    """Keep the chosen subjects; an unknown subject is a user error."""
    available = {q["subject"] for q in questions}
    unknown = sorted(set(subjects) - available)
    if unknown:
        raise UserError(f"MMLU ({path or HUB_DATASET}): unknown subjects {unknown}; available: {sorted(available)}")
    wanted = set(subjects)
    return [q for q in questions if q["subject"] in wanted]


def sample_per_subject(questions: list[dict], per_subject: int, seed: int = 0) -> list[dict]:
    """At most `per_subject` questions of each subject, seeded per subject, kept in file order."""
    if per_subject < 1:
        raise UserError(f"MMLU_PER_SUBJECT must be at least 1 (or None for all), got {per_subject}")
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        by_subject[q["subject"]].append(q)
    kept = []
    for subject, items in by_subject.items():
        # a string seed per subject: the sample of one subject does not depend on which others are loaded
        chosen = random.Random(f"{seed}:{subject}").sample(range(len(items)), min(per_subject, len(items)))
        kept.extend(items[i] for i in sorted(chosen))
    return kept
