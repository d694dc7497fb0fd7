"""Stage 6: paired comparison of the fine-tuned and the base model on the same MMLU questions, and a verdict.

Exact McNemar test on the discordant pairs (b: base right, tuned wrong; c: base wrong, tuned right) and a
paired bootstrap confidence interval of the accuracy delta (tuned - base), overall and per subject.
"""
from __future__ import annotations

import logging
import math
import zlib
from collections import defaultdict
from collections.abc import Sequence

log = logging.getLogger(__name__)

ALPHA = 0.05
CI_LEVEL = 0.95


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: min(1, 2 P(X <= min(b, c))) with X ~ Bin(b + c, 1/2); 1 when b + c = 0."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact big-integer ratio, rounded once to float


def paired_bootstrap_ci(
    base_correct: Sequence[bool], tuned_correct: Sequence[bool], seed: int = 0, n_boot: int = 10000, level: float = CI_LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap CI of the accuracy delta, resampling questions (pairs) with replacement."""
    import numpy as np

    n = len(base_correct)
    b, c = _discordant(base_correct, tuned_correct)
    # The delta of a resample depends only on how many "lost" (b) and "gained" (c) questions it draws, so drawing
    # those counts from a multinomial is the same distribution as resampling n indices, without n_boot * n memory.
    counts = np.random.default_rng(seed).multinomial(n, [b / n, c / n, (n - b - c) / n], size=n_boot)
    deltas = (counts[:, 1] - counts[:, 0]) / n
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return float(low), float(high)


def compare(
    base_correct: Sequence[bool], tuned_correct: Sequence[bool], subjects: Sequence[str], seed: int = 0, n_boot: int = 10000
) -> dict:
    """Overall and per-subject accuracies, delta, exact McNemar p, bootstrap CI and a one-sentence verdict."""
    if not (len(base_correct) == len(tuned_correct) == len(subjects)):
        raise ValueError(f"paired inputs differ in length: {len(base_correct)}, {len(tuned_correct)}, {len(subjects)}")
    if not base_correct:
        raise ValueError("no questions to compare")
    overall = _paired_stats(base_correct, tuned_correct, seed, n_boot)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, subject in enumerate(subjects):
        groups[subject].append(i)
    per_subject = {
        subject: _paired_stats([base_correct[i] for i in idx], [tuned_correct[i] for i in idx],
                               _subject_seed(seed, subject), n_boot)
        for subject, idx in sorted(groups.items())
    }
    return {**overall, "verdict": verdict(overall), "alpha": ALPHA, "ci_level": CI_LEVEL, "n_boot": n_boot,
            "seed": seed, "per_subject": per_subject}


def verdict(stats: dict, alpha: float = ALPHA) -> str:
    """One sentence: direction and size in points, the CI, and whether McNemar finds it significant."""
    delta, p = 100 * stats["delta"], stats["mcnemar_p"]
    change = "did not change" if delta == 0 else f"{'rose' if delta > 0 else 'fell'} {abs(delta):.1f} points"
    sentence = (f"MMLU {change} ({100 * stats['base_accuracy']:.1f}% -> {100 * stats['tuned_accuracy']:.1f}% on "
                f"{stats['n']} questions, {100 * CI_LEVEL:.0f}% CI {100 * stats['ci_low']:+.1f} to "
                f"{100 * stats['ci_high']:+.1f})")
    if p < alpha:
        return f"{sentence}, significant (McNemar p={p:.3g})."
    return f"{sentence}, not significant (McNemar p={p:.3g}): consistent with noise."


def _paired_stats(base: Sequence[bool], tuned: Sequence[bool], seed: int, n_boot: int) -> dict:
    """Accuracies, delta, discordant counts, McNemar p and bootstrap CI of one set of paired answers."""
    n = len(base)
    b, c = _discordant(base, tuned)
    base_acc, tuned_acc = sum(map(bool, base)) / n, sum(map(bool, tuned)) / n
    p = mcnemar_exact(b, c)
    low, high = paired_bootstrap_ci(base, tuned, seed=seed, n_boot=n_boot)
    return {"n": n, "base_accuracy": base_acc, "tuned_accuracy": tuned_acc, "delta": tuned_acc - base_acc,
            "b": b, "c": c, "mcnemar_p": p, "significant": p < ALPHA, "ci_low": low, "ci_high": high}


def _discordant(base: Sequence[bool], tuned: Sequence[bool]) -> tuple[int, int]:
    """(b, c): questions only the base model got right, and only the tuned model got right."""
    b = sum(1 for x, y in zip(base, tuned) if x and not y)
    c = sum(1 for x, y in zip(base, tuned) if y and not x)
    return b, c


def _subject_seed(seed: int, subject: str) -> list[int]:
    """A stable per-subject seed, so one subject's CI does not depend on the others."""
    return [seed, zlib.crc32(subject.encode("utf-8"))]


def pair_rows(base_rows: Sequence[dict], tuned_rows: Sequence[dict]) -> tuple[list[bool], list[bool], list[str]]:
    """Correctness of both models on the questions both answered, matched by (subject, index)."""
    tuned = {(r["subject"], r["index"]): bool(r["correct"]) for r in tuned_rows}
    base_correct, tuned_correct, subjects = [], [], []
    for row in base_rows:
        key = (row["subject"], row["index"])
        if key in tuned:
            base_correct.append(bool(row["correct"]))
            tuned_correct.append(tuned[key])
            subjects.append(row["subject"])
    if len(subjects) < max(len(base_rows), len(tuned_rows)):
        log.warning("regression: only %d questions are common to the base (%d) and fine-tuned (%d) MMLU runs",
                    len(subjects), len(base_rows), len(tuned_rows))
    return base_correct, tuned_correct, subjects


def regression_stage(settings, cache, baseline_mmlu: dict | None, tuned_mmlu: dict | None) -> dict | None:
    """Stage 6: compare the best adapter's MMLU answers with the base model's; None when either is missing."""
    from scripts.run_state import fingerprint

    if not baseline_mmlu or not tuned_mmlu:
        log.info("regression: needs both the baseline and the fine-tuned MMLU results; skipped")
        return None
    base, tuned, subjects = pair_rows(baseline_mmlu["rows"], tuned_mmlu["rows"])
    if not subjects:
        log.warning("regression: the baseline and fine-tuned MMLU runs share no question; skipped")
        return None
    key = fingerprint(base, tuned, subjects, settings.seed)
    if "regression" not in settings.stages:
        return cache.load("regression", key)

    def compute() -> dict:
        result = compare(base, tuned, subjects, seed=settings.seed)
        log.info("regression: %s", result["verdict"])
        return result

    return cache.run("regression", key, compute)
