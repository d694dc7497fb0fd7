"""Stages 2 and 6: MMLU data (original CSV layout or the Hub's cais/mmlu) and k-shot log-likelihood evaluation.

The protocol is the lm-evaluation-harness `mmlu` task: the first k `dev` questions of the same subject as shots,
the prompt "The following are multiple choice questions (with answers) about <subject>.\\n\\n", each shot as
"<question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer: <letter>\\n\\n", then the question ending in "Answer:".
The prediction is the letter whose continuation (" A", " B", " C", " D") has the highest log-likelihood,
computed in float32 whatever the model's dtype (`float32_head`). The tokenizer's own special tokens (a BOS for
Llama-style tokenizers) are kept, as the harness does since lm-eval 0.4.9.2.
"""
from __future__ import annotations

import csv
import inspect
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from scripts import distributed
from scripts.errors import UserError
from scripts.gpu_memory import split_on_oom

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
CSV_SPLITS = {"dev": "dev", "val": "val", "validation": "val", "test": "test"}
HUB_SPLITS = {"dev": "dev", "val": "validation", "validation": "validation", "test": "test"}
HUB_DATASET = "cais/mmlu"


# --- data -------------------------------------------------------------------------------------------------

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
    batch_size: int = 16,
    *,
    max_length: int | None = None,
    done: Callable[[list[dict]], None] | None = None,
    share_prefix: bool = True,
) -> list[dict]:
    """Per question (input order): subject, index, prediction, answer, correct and the 4 log-likelihoods.

    `done` receives each finished batch of rows (e.g. to save them as they come); prompts longer than
    `max_length` (default: the model's context size) are cut from the left, as the harness does. With
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
        for prefix, members in groups.items():
            cache = prefix_cache(model, list(prefix))
            for batch in _length_sorted_batches(members, lengths, batch_size):
                finish(batch, split_on_oom(lambda b, p=prefix, c=cache: suffix_scores(p, c, b), batch,
                                           "questions"))
        for batch in _length_sorted_batches(single, lengths, batch_size):
            finish(batch, split_on_oom(single_scores, batch, "questions"))
        for batch in _length_sorted_batches(multi, lengths, max(1, batch_size // len(LETTERS))):
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


def score_single_token(model, contexts: list[list[int]], letter_ids: list[list[int]], tokenizer=None) -> list[list[float]]:
    """One forward per context: the log-probabilities of the 4 letter tokens at the last position."""
    import torch

    logprobs = _last_logprobs(model, contexts, keep=1, pad_id=_pad_id(tokenizer))[:, -1, :]
    index = torch.tensor(letter_ids, device=logprobs.device)
    return logprobs.gather(1, index).tolist()


def score_continuations(model, pairs: list[tuple[list[int], list[int]]], tokenizer=None) -> list[float]:
    """Summed log-probability of each continuation after its context (teacher forcing), one row per pair."""
    import torch

    sequences = [ctx + cont for ctx, cont in pairs]
    longest = max(len(cont) for _, cont in pairs)
    # left padding aligns every sequence at the right, so the last longest+1 positions cover every continuation
    logprobs = _last_logprobs(model, sequences, keep=longest + 1, pad_id=_pad_id(tokenizer))
    totals = []
    for row, (_, cont) in enumerate(pairs):
        n = len(cont)
        predicting = logprobs[row, -(n + 1): -1, :]  # position t predicts token t+1
        totals.append(predicting.gather(1, torch.tensor(cont, device=predicting.device)[:, None]).sum().item())
    return totals


def supports_prefix_cache(model) -> bool:
    """Whether the model's forward takes position_ids and a key/value cache (needed to start after a prefix)."""
    return {"position_ids", "past_key_values"} <= _forward_parameters(model)


def prefix_cache(model, prefix: list[int]):
    """The key/value cache of one prompt prefix (a batch of one)."""
    import torch

    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, **_keep_last(model, 1))
    return out.past_key_values


def score_after_prefix(model, cache, prefix_length: int, suffixes: list[list[int]], letter_ids: list[list[int]],
                       tokenizer=None) -> list[list[float]]:
    """One forward per question over the tokens after a shared prefix whose cache is given: the 4 letters' log-probs.

    The suffixes are left-padded, so the padding sits between the prefix and each suffix; the attention mask
    hides it and the positions continue from the prefix, so every row sees exactly prefix + its own suffix.
    """
    import copy

    import torch

    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), _pad_id(tokenizer), dtype=torch.long)
    suffix_mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        ids[row, width - len(suffix):] = torch.tensor(suffix)
        suffix_mask[row, width - len(suffix):] = 1
    mask = torch.cat([torch.ones((len(suffixes), prefix_length), dtype=torch.long), suffix_mask], dim=1)
    positions = prefix_length + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        past = copy.deepcopy(cache)  # the forward appends to the cache it is given; the prefix's stays as it is
        past.batch_repeat_interleave(len(suffixes))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       past_key_values=past, use_cache=True, **_keep_last(model, 1)).logits[:, -1, :]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(1, torch.tensor(letter_ids, device=logprobs.device)).tolist()


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


@contextmanager
def float32_head(model) -> Iterator[None]:
    """Within it, the model's output head runs in float32 on the last hidden states, whatever the model's dtype.

    In bf16 the logits move in steps of 0.125 near the values MMLU letters get, so two letters often tie exactly
    and the first wins by default (docs/RESULTS.md, section 16). A forward hook replaces the head's output with
    hidden @ W.T in float32 (W dequantized when the head is 4-bit); the log-softmax normaliser is float32 too.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or hasattr(head, "base_layer"):  # e.g. a head wrapped by an adapter
        log.warning("MMLU: the output head is %s, not a plain linear layer; scoring with the model's own logits",
                    type(head).__name__)
        yield
        return
    weight = _dense_weight(head).float()
    bias = None if head.bias is None else head.bias.float()
    handle = head.register_forward_hook(
        lambda module, args, output: torch.nn.functional.linear(args[0].float(), weight, bias))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would round the products to 10 mantissa bits again
    try:
        yield
    finally:
        handle.remove()
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _dense_weight(head):
    """The head's weight as a dense tensor (a bitsandbytes 4-bit head is dequantized)."""
    weight = head.weight
    if weight.dtype.is_floating_point:
        return weight.detach()
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight.data, weight.quant_state)


def _keep_last(model, keep: int) -> dict:
    """The forward argument that limits the logits to the last `keep` positions, when the model has one."""
    params = _forward_parameters(model)
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: keep}
    return {}


def _last_logprobs(model, sequences: list[list[int]], keep: int, pad_id: int):
    """Float32 log-softmax over the vocabulary of the last `keep` positions of left-padded sequences."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    device = model.get_input_embeddings().weight.device
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "position_ids" in _forward_parameters(model):  # positions count real tokens only: left padding shifts nothing
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    kwargs.update(_keep_last(model, keep))
    with torch.inference_mode():
        logits = model(**kwargs).logits[:, -keep:, :]
    return torch.log_softmax(logits.float(), dim=-1)


def _forward_parameters(model) -> set[str]:
    """Parameter names of the underlying model's forward (through a PEFT wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def _pad_id(tokenizer) -> int:
    """Any valid id for padding (masked out): pad, else eos, else 0."""
    if tokenizer is None:
        return 0
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


HARNESS_DEFAULT_LENGTH = 2048  # lm-evaluation-harness's HFLM._DEFAULT_MAX_LENGTH
_NO_LIMIT = 1e29  # tokenizers without a limit report int(1e30)


def context_size(model, tokenizer=None) -> int:
    """The model's context length as lm-evaluation-harness finds it: n_positions, max_position_embeddings or n_ctx
    of the (text) config, else the tokenizer's model_max_length when it sets one, else 2048."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (text_config, config):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(source, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        return limit
    return HARNESS_DEFAULT_LENGTH


def _truncate(context: list[int], continuations: list[list[int]], max_length: int | None):
    """Cut the context from the left so that context + the longest continuation fits."""
    if max_length is None:
        return context, continuations
    room = max_length - max(len(c) for c in continuations)
    if len(context) > room:
        context = context[-room:]
    return context, continuations


def _length_sorted_batches(indices: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices, longest first (so an out-of-memory error shows up at once) with little padding."""
    ordered = sorted(indices, key=lambda i: -lengths[i])
    return [ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)]


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
    """Read PATH_MMLU's CSVs when an MMLU stage runs: a bad file stops the run before anything is written."""
    if settings.path_mmlu is None or not {"baseline_mmlu", "mmlu_best"} & set(settings.stages):
        return  # the Hub's copy is checked when it is loaded
    load_mmlu(settings.path_mmlu, "test")
    if settings.mmlu_k_shot > 0:
        load_mmlu(settings.path_mmlu, "dev")


def mmlu_stage(stage: str, settings, cache, store, models, adapter: str | None = None) -> dict | None:
    """Stage 2 (base model) or 6 (best adapter): MMLU accuracy, answers in the store, resumable."""
    from scripts.run_state import fingerprint

    if adapter is None and stage != "baseline_mmlu":
        log.info("%s: no adapter to evaluate; skipped", stage)
        return None
    key = fingerprint(settings.base_model_id, adapter, _adapter_stamp(adapter), str(settings.path_mmlu),
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
                    "adapter_weights": _adapter_stamp(adapter)},  # a retrained adapter's answers are not the old ones
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


def _adapter_stamp(adapter: str | None) -> list | None:
    """Names, sizes and times of an adapter's weight files, so a retrained adapter is evaluated again."""
    if not adapter:
        return None
    weights = sorted(Path(adapter).glob("adapter_model*"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
