"""Benchmark of MMLU scoring: one forward per question, with and without a shared prefix, against four per question.

Usage: python -m bench.bench_mmlu MODEL MMLU_DIR [--per-subject N] [--subjects a,b] [--batch-size B] [--k-shot K]
    [--no-harness]
The reference scores each question the lm-evaluation-harness way: the four (context, " A".." D") continuations
as four full sequences; with --no-harness (all 14,042 questions take minutes that way) the reference is one
forward per question without the shared prefix, and the five-call tokenization is not timed either. The
pipeline (scripts/mmlu.evaluate_mmlu) runs one forward per question and reads the four letters'
log-probabilities at its last position, and by default runs each subject's header and shots once and starts
every question from their key/value cache. Printed: seconds, ratio, accuracy, and on how many
questions each predicts the same letter as the reference.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench import save_json, timed
from scripts.mmlu import (
    build_prompt,
    encode_all_requests,
    encode_requests,
    evaluate_mmlu,
    shots_by_subject,
    shots_for,
)
from scripts.mmlu_data import LETTERS, load_mmlu
from scripts.mmlu_scoring import score_continuations
from scripts.models import load_model_and_tokenizer


def reference_predictions(model, tokenizer, questions: list[dict], dev: list[dict], k_shot: int,
                          batch_size: int) -> list[str]:
    """Four sequences per question, batch_size sequences per forward: the likeliest letter of each."""
    shots = shots_by_subject(dev)
    requests = [encode_requests(tokenizer, build_prompt(q, shots_for(q, shots, k_shot))) for q in questions]
    per_batch = max(1, batch_size // len(LETTERS))
    predictions = []
    for start in range(0, len(requests), per_batch):
        chunk = requests[start: start + per_batch]
        values = score_continuations(model, [(ctx, cont) for ctx, conts in chunk for cont in conts], tokenizer)
        for j in range(0, len(values), len(LETTERS)):
            four = values[j: j + len(LETTERS)]
            predictions.append(LETTERS[four.index(max(four))])
    return predictions


def harness_split(tokenizer, prompt: str) -> tuple[list[int], list[list[int]]]:
    """The harness's way, five tokenizer calls per prompt: the context, then context + each letter, keeping the tail."""
    context = tokenizer(prompt)["input_ids"]
    continuations = []
    for letter in LETTERS:
        whole = tokenizer(prompt + " " + letter)["input_ids"]
        merged = not (whole[: len(context)] == context and len(whole) > len(context))
        continuations.append(tokenizer(" " + letter, add_special_tokens=False)["input_ids"] if merged
                             else whole[len(context):])
    return context, continuations


def tokenization_rows(tokenizer, questions: list[dict], dev: list[dict], k_shot: int) -> list[dict]:
    """Seconds to tokenize every prompt and its four letter endings: five calls per prompt against batched calls."""
    shots = shots_by_subject(dev)
    prompts = [build_prompt(q, shots_for(q, shots, k_shot)) for q in questions]
    one_by_one, ref_seconds = timed(lambda: [harness_split(tokenizer, p) for p in prompts])
    batched, seconds = timed(lambda: encode_all_requests(tokenizer, prompts))
    assert batched == one_by_one, "batched tokenization differs from one call per text"
    return [{"variant": "tokenize: 5 calls per prompt", "seconds": round(ref_seconds, 2), "ratio": 1.0},
            {"variant": "tokenize: batches of 256 prompts", "seconds": round(seconds, 2),
             "ratio": round(ref_seconds / seconds, 2)}]


def _accuracy(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions equal to the answers."""
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


def main() -> None:
    """Score the same questions both ways and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("mmlu_dir", type=Path)
    p.add_argument("--per-subject", type=int, default=None, help="questions per subject (default: all)")
    p.add_argument("--subjects", default=None, help="comma-separated subjects (default: all 57)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--quantization", default="none")
    p.add_argument("--no-harness", action="store_true", help="skip the four-sequence reference and the five-call "
                   "tokenization; one forward per question is the reference")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    subjects = args.subjects.split(",") if args.subjects else None
    questions = load_mmlu(args.mmlu_dir, "test", subjects=subjects, per_subject=args.per_subject)
    dev = load_mmlu(args.mmlu_dir, "dev", subjects=subjects)
    model, tokenizer = load_model_and_tokenizer(args.model, quantization=args.quantization)
    answers = [q["answer"] for q in questions]
    tokenization = [] if args.no_harness else tokenization_rows(tokenizer, questions, dev, args.k_shot)
    for r in tokenization:
        print(f"prompt tokenization, {r['variant']:35} {r['seconds']:6.2f} s {r['ratio']:6.2f}x", flush=True)

    rows, reference, ref_seconds = [], None, None
    if not args.no_harness:
        reference, ref_seconds = timed(lambda: reference_predictions(model, tokenizer, questions, dev, args.k_shot,
                                                                     args.batch_size))
        rows = [{"variant": "reference: 4 sequences per question", "seconds": round(ref_seconds, 2), "ratio": 1.0,
                 "accuracy": _accuracy(reference, answers), "same_prediction": len(questions)}]
    for name, share in (("1 forward per question", False), ("1 forward per question, shared prefix", True)):
        scored, seconds = timed(lambda: evaluate_mmlu(model, tokenizer, questions, dev, args.k_shot, args.batch_size,
                                                      share_prefix=share))
        predictions = [r["prediction"] for r in scored]
        if reference is None:  # --no-harness: the first variant is the reference
            reference, ref_seconds = predictions, seconds
        rows.append({"variant": name, "seconds": round(seconds, 2), "ratio": round(ref_seconds / seconds, 2),
                     "accuracy": _accuracy(predictions, answers),
                     "same_prediction": sum(a == b for a, b in zip(reference, predictions))})
        print(f"{name}: {seconds:.1f} s", flush=True)
    rows = tokenization + rows
    print(f"{len(questions)} MMLU questions, {args.k_shot}-shot, batches of {args.batch_size} sequences")
    print(f"{'variant':40} {'seconds':>8} {'speed-up':>8} {'accuracy':>8} {'same letter':>12}")
    for r in rows[len(tokenization):]:
        print(f"{r['variant']:40} {r['seconds']:8.1f} {r['ratio']:8.2f} {r['accuracy']:8.4f} "
              f"{r['same_prediction']:>6}/{len(questions)}")
    save_json(args.out, "bench_mmlu.json", rows)


if __name__ == "__main__":
    main()
