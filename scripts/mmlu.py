"""Stages 2 and 6: k-shot MMLU evaluation: the harness's prompts, the likeliest letter per question, the stage.

The protocol is the lm-evaluation-harness `mmlu` task: the first k `dev` questions of the same subject as shots,
the prompt "The following are multiple choice questions (with answers) about <subject>.\\n\\n", each shot as
"<question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer: <letter>\\n\\n", then the question ending in "Answer:".
The prediction is the letter whose continuation (" A", " B", " C", " D") has the highest log-likelihood,
computed in float32 whatever the model's dtype (`float32_head`, scripts/mmlu_scoring.py). The tokenizer's own
special tokens (a BOS for Llama-style tokenizers) are kept, as the harness does since lm-eval 0.4.9.2. The
questions come from scripts/mmlu_data.py.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

from scripts import distributed
from scripts.auto_batch import AUTO, FIXED_SIZE, auto_batch, sorted_batches
from scripts.errors import UserError
from scripts.gpu_memory import split_on_oom
from scripts.mmlu_data import LETTERS, check_hub_copy, load_mmlu
from scripts.mmlu_scoring import (
    context_size,
    float32_head,
    prefix_cache,
    score_after_prefix,
    score_continuations,
    score_single_token,
    supports_prefix_cache,
)
from scripts.run_state import adapter_stamp, fingerprint

log = logging.getLogger(__name__)


# --- prompt -----------------------------------------------------------------------------------------------

def format_question(question: dict) -> str:
    """A question with its four lettered choices, ending in "Answer:"."""
    lines = [question["question"].strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, question["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def build_prompt(question: dict, shots: Sequence[dict]) -> str:
    """The harness's k-shot prompt: subject header, answered shots, then the question."""
    header = f"The following are multiple choice questions (with answers) about {question['subject'].replace('_', ' ')}.\n\n"
    answered = "".join(f"{format_question(s)} {s['answer']}\n\n" for s in shots)
    return header + answered + format_question(question)


def shots_by_subject(dev: Sequence[dict]) -> dict[str, list[dict]]:
    """The dev questions of each subject in file order (the harness samples shots with `first_n`)."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for q in dev:
        grouped[q["subject"]].append(q)
    return grouped


def shots_for(question: dict, shots: dict[str, list[dict]], k_shot: int) -> list[dict]:
    """The first k dev questions of the subject, never the question itself (when evaluating dev)."""
    if k_shot == 0:
        return []
    pool = [s for s in shots.get(question["subject"], []) if not _same_question(s, question)]
    if not pool:
        raise UserError(f"MMLU: no dev questions for subject {question['subject']!r}, needed for {k_shot}-shot "
                        "prompts; add its dev CSV or set MMLU_K_SHOT=0")
    return pool[:k_shot]


def _same_question(a: dict, b: dict) -> bool:
    """Whether two rows are the same question."""
    return a["question"] == b["question"] and list(a["choices"]) == list(b["choices"])


# --- scoring ----------------------------------------------------------------------------------------------

def encode_requests(tokenizer, prompt: str) -> tuple[list[int], list[list[int]]]:
    """Context ids and the ids of the four letter continuations, split as the harness does."""
    return encode_all_requests(tokenizer, [prompt])[0]


def encode_all_requests(tokenizer, prompts: Sequence[str], chunk: int = 256,
                        progress: bool = False) -> list[tuple[list[int], list[list[int]]]]:
    """encode_requests for many prompts, each chunk's 5 texts per prompt tokenized in one call (a fast tokenizer
    spreads a batch over the cores; on MMLU this takes as long as the model's forwards)."""
    from tqdm.auto import tqdm

    standalone = [tokenizer(" " + letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
    encoded = []
    for start in tqdm(range(0, len(prompts), chunk), desc="MMLU prompts", unit="chunk", disable=not progress):
        part = prompts[start: start + chunk]
        ids = tokenizer([p + end for p in part for end in ("", *(" " + letter for letter in LETTERS))])["input_ids"]
        for k in range(len(part)):
            context, *wholes = ids[5 * k: 5 * k + 5]
            encoded.append((context, [_continuation(context, whole, alone) for whole, alone in zip(wholes, standalone)]))
    return encoded


def _continuation(context: list[int], whole: list[int], standalone: list[int]) -> list[int]:
    """The tokens that context + letter adds to the context; the letter's own tokens when it merged into the context."""
    if whole[: len(context)] == context and len(whole) > len(context):
        return whole[len(context):]
    return standalone


def evaluate_mmlu(
    model,
    tokenizer,
    questions: Sequence[dict],
    dev: Sequence[dict],
    k_shot: int = 5,
    batch_size: int | str = 16,
    *,
    max_length: int | None = None,
    done: Callable[[list[dict]], None] | None = None,
    share_prefix: bool = True,
) -> list[dict]:
    """Per question (input order): subject, index, prediction, answer, correct and the 4 log-likelihoods.

    `done` receives each finished batch of rows (e.g. to save them as they come); prompts longer than
    `max_length` (default: the model's context size) are cut from the left, as the harness does; batch_size="auto"
    sizes each batch to the GPU memory free when the questions start (scripts/auto_batch.py). With
    `share_prefix`, the header and shots that the questions of a subject share go through the model once, and
    each question's forward starts from their key/value cache.
    """
    from tqdm.auto import tqdm

    shots = shots_by_subject(dev)
    max_length = max_length or context_size(model, tokenizer)
    prompts = [build_prompt(q, shots_for(q, shots, k_shot)) for q in questions]
    requests = encode_all_requests(tokenizer, prompts, progress=True)
    cut = [_truncate(ctx, conts, max_length) for ctx, conts in requests]
    if any(len(a[0]) != len(b[0]) for a, b in zip(cut, requests)):
        log.warning("MMLU: %d prompts are longer than %s tokens and were cut from the left",
                    sum(len(a[0]) != len(b[0]) for a, b in zip(cut, requests)), max_length)
    requests = cut
    rows: list[dict | None] = [None] * len(questions)
    single = [i for i, (_, conts) in enumerate(requests) if all(len(c) == 1 for c in conts)]
    multi = [i for i, (_, conts) in enumerate(requests) if not all(len(c) == 1 for c in conts)]
    groups: dict[tuple[int, ...], list[int]] = {}
    if share_prefix and single and supports_prefix_cache(model):
        groups, single = _group_by_prefix(tokenizer, questions, prompts, requests, single)
    if multi:
        log.info("MMLU: %d of %d questions have a multi-token letter continuation; scoring them in full",
                 len(multi), len(questions))

    with tqdm(total=len(questions), desc="MMLU", unit="q") as bar, float32_head(model):
        def finish(indices: list[int], scores: list[list[float]]) -> None:
            batch_rows = []
            for i, loglik in zip(indices, scores):
                rows[i] = _result_row(questions[i], loglik)
                batch_rows.append(rows[i])
            if done:
                done(batch_rows)
            bar.update(len(indices))

        def single_scores(batch: list[int]) -> list[list[float]]:
            contexts = [requests[i][0] for i in batch]
            return score_single_token(model, contexts, [[c[0] for c in requests[i][1]] for i in batch], tokenizer)

        def multi_scores(batch: list[int]) -> list[list[float]]:
            values = score_continuations(model, [(requests[i][0], c) for i in batch for c in requests[i][1]], tokenizer)
            return [values[j: j + len(LETTERS)] for j in range(0, len(values), len(LETTERS))]

        def suffix_scores(prefix: tuple[int, ...], cache, batch: list[int]) -> list[list[float]]:
            suffixes = [requests[i][0][len(prefix):] for i in batch]
            return score_after_prefix(model, cache, len(prefix), suffixes,
                                      [[c[0] for c in requests[i][1]] for i in batch], tokenizer)

        lengths = [len(ctx) for ctx, _ in requests]
        size = _batch_size_at(model, batch_size, lengths)  # after float32_head: its float32 head is held by then
        for prefix, members in groups.items():
            cache = prefix_cache(model, list(prefix))
            for batch in _length_sorted_batches(members, lengths, size):
                finish(batch, split_on_oom(lambda b, p=prefix, c=cache: suffix_scores(p, c, b), batch,
                                           "questions"))
        for batch in _length_sorted_batches(single, lengths, size):
            finish(batch, split_on_oom(single_scores, batch, "questions"))
        for batch in _length_sorted_batches(multi, lengths, _per_letter(size)):
            finish(batch, split_on_oom(multi_scores, batch, "questions"))
    return rows  # type: ignore[return-value]


def summarize_mmlu(rows: Sequence[dict]) -> dict:
    """Accuracy micro-averaged over questions, the macro average over subjects, and per subject."""
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_subject[row["subject"]].append(bool(row["correct"]))
    per_subject = {
        subject: {"accuracy": sum(c) / len(c), "correct": sum(c), "count": len(c)}
        for subject, c in sorted(by_subject.items())
    }
    correct = sum(s["correct"] for s in per_subject.values())
    return {
        "accuracy": correct / len(rows) if rows else None,
        "correct": correct,
        "count": len(rows),
        "macro_accuracy": sum(s["accuracy"] for s in per_subject.values()) / len(per_subject) if per_subject else None,
        "by_subject": per_subject,
    }


def _group_by_prefix(tokenizer, questions: Sequence[dict], prompts: list[str], requests: list, indices: list[int]):
    """({shared ids: question indices}, the rest): each question's tokens up to where its header and shots end.

    The shared part is the longest run of the question's own tokens that the header-and-shots text alone also
    gives, so a token merged across the boundary (e.g. the shots' closing blank line with the question's first
    character) stays with the question. A prompt cut from the left shares nothing and keeps the plain path.
    """
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    encoded: dict[str, list[int]] = {}
    rest = []
    for i in indices:
        text = prompts[i][: len(prompts[i]) - len(format_question(questions[i]))]
        if text not in encoded:
            encoded[text] = tokenizer(text)["input_ids"]
        prefix, context = encoded[text], requests[i][0]
        same = next((j for j, (a, b) in enumerate(zip(prefix, context)) if a != b), min(len(prefix), len(context)))
        same = min(same, len(context) - 1)  # at least the last token goes through the question's own forward
        if same >= max(1, len(prefix) - 2):
            groups[tuple(context[:same])].append(i)
        else:
            rest.append(i)
    return dict(groups), rest


def _truncate(context: list[int], continuations: list[list[int]], max_length: int | None):
    """Cut the context from the left so that context + the longest continuation fits."""
    if max_length is None:
        return context, continuations
    room = max_length - max(len(c) for c in continuations)
    if len(context) > room:
        context = context[-room:]
    return context, continuations


def _length_sorted_batches(indices: list[int], lengths: list[int],
                           batch_size: int | Callable[[int], int]) -> list[list[int]]:
    """Batches of indices, longest first (so an out-of-memory error shows up at once) with little padding; a
    callable batch_size gives the size at the batch's longest length."""
    return sorted_batches(indices, lengths, batch_size)


def _batch_size_at(model, batch_size: int | str, lengths: list[int]) -> int | Callable[[int], int]:
    """batch_size, or with "auto" the most questions of a given length that fit the GPU memory free now (said
    once in the log)."""
    if batch_size != AUTO:
        return batch_size
    if not lengths:
        return FIXED_SIZE
    auto = auto_batch(model)
    auto.log_choice(max(lengths), min(lengths), len(lengths), "questions")
    return auto.prompts_at


def _per_letter(size: int | Callable[[int], int]) -> int | Callable[[int], int]:
    """The batch size of questions scored in full: each takes one row per letter."""
    if isinstance(size, int):
        return max(1, size // len(LETTERS))
    return lambda length: max(1, size(length) // len(LETTERS))


def _result_row(question: dict, loglik: list[float]) -> dict:
    """The evaluated row of one question; the first letter wins a tie."""
    prediction = LETTERS[max(range(len(LETTERS)), key=lambda j: loglik[j])]
    return {
        "subject": question["subject"],
        "index": question["index"],
        "prediction": prediction,
        "answer": question["answer"],
        "correct": prediction == question["answer"],
        "loglikelihoods": [float(v) for v in loglik],
    }


# --- stage ------------------------------------------------------------------------------------------------

def check_data(settings) -> None:
    """When an MMLU stage runs: PATH_MMLU's CSVs read (a bad file stops the run before anything is written), or
    without PATH_MMLU the Hub's copy reachable or cached."""
    if not {"baseline_mmlu", "mmlu_best"} & set(settings.stages):
        return
    if settings.path_mmlu is None:
        check_hub_copy(settings.hf_token)
        return
    load_mmlu(settings.path_mmlu, "test")
    if settings.mmlu_k_shot > 0:
        load_mmlu(settings.path_mmlu, "dev")


def mmlu_stage(stage: str, settings, cache, store, models, adapter: str | None = None) -> dict | None:
    """Stage 2 (base model) or 6 (best adapter): MMLU accuracy, answers in the store, resumable."""

    if adapter is None and stage != "baseline_mmlu":
        log.info("%s: no adapter to evaluate; skipped", stage)
        return None
    key = fingerprint(settings.base_model_id, adapter, adapter_stamp(adapter), str(settings.path_mmlu),
                      settings.mmlu_per_subject, settings.seed, settings.mmlu_k_shot, settings.quantization,
                      settings.eval_precision)
    if stage not in settings.stages:
        return cache.load(stage, key)
    return cache.run(stage, key, lambda: _run_mmlu(stage, settings, store, models, adapter))


def _run_mmlu(stage: str, settings, store, models, adapter: str | None) -> dict | None:
    """Load the questions, evaluate what the store does not hold yet, and summarize.

    With several processes (scripts/distributed.py) each evaluates its share of the questions left to do; the
    main process (the only one with a store) stores the gathered answers and returns the summary, the others None
    (they keep their answers in a Spool until then, so an interruption loses none).
    """
    from scripts.store import Spool, data_fingerprint

    questions = load_mmlu(settings.path_mmlu, "test", per_subject=settings.mmlu_per_subject, seed=settings.seed)
    dev = load_mmlu(settings.path_mmlu, "dev") if settings.mmlu_k_shot > 0 else []
    run_id, todo = None, None
    if store is not None:  # no store on the other processes of a launch
        run_id = store.start_run(
            kind=stage, model=settings.base_model_id, adapter=adapter,
            config={"k_shot": settings.mmlu_k_shot, "per_subject": settings.mmlu_per_subject, "seed": settings.seed,
                    "adapter_weights": adapter_stamp(adapter)},  # a retrained adapter's answers are not the old ones
            data_fingerprint=data_fingerprint([[q["subject"], q["index"], q["question"]] for q in questions]),
        )
        redo = getattr(settings, "force", False)  # --force scores every question again
        # what other processes scored before an interruption
        Spool(settings.db_path, "mmlu", run_id).drain(lambda rows: store.add_mmlu(run_id, rows), resume=not redo)
        stored = {} if redo else {(r["subject"], r["index"]): r for r in store.mmlu_rows(run_id)}
        todo = [q for q in questions if (q["subject"], q["index"]) not in stored]
        if stored:
            log.info("%s: resuming, %d of %d answers already in the store", stage, len(questions) - len(todo),
                     len(questions))
    run_id, todo = distributed.broadcast((run_id, todo))
    spool = Spool(settings.db_path, "mmlu", run_id)
    start = time.perf_counter()
    if todo:
        model, tokenizer = models.get(adapter)
        mine = [todo[i] for i in distributed.shard(len(todo))]
        rows = evaluate_mmlu(model, tokenizer, mine, dev, k_shot=settings.mmlu_k_shot,
                             batch_size=settings.eval_batch_size,
                             done=lambda rows: store.add_mmlu(run_id, rows) if store is not None
                             else spool.append(distributed.rank(), rows))
        shares = distributed.gather(rows)
        if shares is None:
            return None
        for share in shares[1:]:  # the other processes' answers (the main process stored its own batch by batch)
            store.add_mmlu(run_id, share)
        spool.clear()
    elif not distributed.is_main():
        return None
    by_key = {(r["subject"], r["index"]): r for r in store.mmlu_rows(run_id)}
    rows = [by_key[(q["subject"], q["index"])] for q in questions]
    summary = summarize_mmlu(rows)
    log.info("%s: accuracy %.1f%% on %d questions", stage, 100 * summary["accuracy"], summary["count"])
    summary.update(
        run_id=run_id, adapter=adapter, k_shot=settings.mmlu_k_shot, seconds=round(time.perf_counter() - start, 1),
        rows=[{k: r[k] for k in ("subject", "index", "prediction", "answer", "correct")} for r in rows],
    )
    return summary
