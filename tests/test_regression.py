"""Tests for scripts/regression.py: exact McNemar against hand-computed sums, bootstrap CI, verdict, stage."""
import math
from types import SimpleNamespace

import pytest

from scripts.regression import compare, mcnemar_exact, pair_rows, paired_bootstrap_ci, regression_stage
from scripts.run_state import StageCache


def _pairs(both: int, lost: int, gained: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Paired answers with the given counts of (right, right), (right, wrong), (wrong, right), (wrong, wrong)."""
    base = [True] * both + [True] * lost + [False] * gained + [False] * neither
    tuned = [True] * both + [False] * lost + [True] * gained + [False] * neither
    return base, tuned


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (10, 2, 2 * (1 + 12 + 66) / 4096),  # 0.0386
        (2, 10, 2 * (1 + 12 + 66) / 4096),  # symmetric
        (0, 5, 2 / 32),  # 0.0625
        (1, 9, 2 * 11 / 1024),  # 0.0215
        (5, 5, 1.0),  # b = c
        (7, 7, 1.0),
        (0, 0, 1.0),  # no discordant pair
        (3, 4, 1.0),  # 2 * 64/128 = 1
    ],
)
def test_mcnemar_exact_matches_hand_computed_binomial_sums(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_b10_c2_is_0_0386():
    assert round(mcnemar_exact(10, 2), 4) == 0.0386


def test_mcnemar_large_counts_agree_with_the_normal_approximation():
    b, c = 5000, 5300  # far beyond float range for 2**n: must still be exact and finite
    z = (abs(b - c) - 1) / math.sqrt(b + c)  # continuity-corrected McNemar
    normal_p = math.erfc(z / math.sqrt(2))
    assert mcnemar_exact(b, c) == pytest.approx(normal_p, rel=0.05)
    assert mcnemar_exact(5000, 5000) == 1.0


def test_bootstrap_ci_is_seeded_contains_the_delta_and_matches_the_normal_width():
    base, tuned = _pairs(both=1200, lost=150, gained=100, neither=550)
    n = len(base)
    ci = paired_bootstrap_ci(base, tuned, seed=3, n_boot=20000)
    assert ci == paired_bootstrap_ci(base, tuned, seed=3, n_boot=20000)
    delta = (100 - 150) / n
    assert ci[0] < delta < ci[1]
    p_lost, p_gained = 150 / n, 100 / n
    sd = math.sqrt((p_lost + p_gained - (p_gained - p_lost) ** 2) / n)
    assert ci[0] == pytest.approx(delta - 1.96 * sd, abs=0.0015)
    assert ci[1] == pytest.approx(delta + 1.96 * sd, abs=0.0015)


def test_bootstrap_ci_is_a_point_when_both_models_agree_everywhere():
    base, tuned = _pairs(both=30, lost=0, gained=0, neither=20)
    assert paired_bootstrap_ci(base, tuned, seed=0, n_boot=500) == (0.0, 0.0)


def test_compare_overall_per_subject_and_verdict():
    # subject "a": 40 questions, base 30 right, tuned 20 right (lost 12, gained 2); "b": tuned gains 1 of 10
    base_a, tuned_a = _pairs(both=18, lost=12, gained=2, neither=8)
    base_b, tuned_b = _pairs(both=5, lost=0, gained=1, neither=4)
    result = compare(base_a + base_b, tuned_a + tuned_b, ["a"] * 40 + ["b"] * 10, seed=0, n_boot=2000)
    assert result["n"] == 50
    assert result["base_accuracy"] == pytest.approx(35 / 50)
    assert result["tuned_accuracy"] == pytest.approx(26 / 50)
    assert result["delta"] == pytest.approx(-9 / 50)
    assert (result["b"], result["c"]) == (12, 3)
    assert result["mcnemar_p"] == pytest.approx(2 * sum(math.comb(15, k) for k in range(4)) / 2**15)
    assert result["significant"] is True
    assert result["ci_low"] <= result["delta"] <= result["ci_high"]
    a, b = result["per_subject"]["a"], result["per_subject"]["b"]
    assert (a["n"], a["b"], a["c"], a["delta"]) == (40, 12, 2, pytest.approx(-10 / 40))
    assert a["mcnemar_p"] == pytest.approx(2 * sum(math.comb(14, k) for k in range(3)) / 2**14)
    assert (b["n"], b["b"], b["c"], b["delta"], b["mcnemar_p"]) == (10, 0, 1, pytest.approx(0.1), 1.0)
    assert result["verdict"].startswith("MMLU fell 18.0 points (70.0% -> 52.0% on 50 questions, 95% CI")
    assert result["verdict"].endswith(f"significant (McNemar p={result['mcnemar_p']:.3g}).")
    assert compare(base_a + base_b, tuned_a + tuned_b, ["a"] * 40 + ["b"] * 10, seed=0, n_boot=2000) == result


def test_verdict_says_not_significant_for_a_small_change():
    base, tuned = _pairs(both=50, lost=3, gained=2, neither=45)
    result = compare(base, tuned, ["x"] * 100, n_boot=1000)
    assert result["verdict"].startswith("MMLU fell 1.0 points")
    assert result["verdict"].endswith(": consistent with noise.")
    assert "not significant (McNemar p=1)" in result["verdict"]
    same = compare(base, base, ["x"] * 100, n_boot=100)
    assert same["verdict"].startswith("MMLU did not change") and same["mcnemar_p"] == 1.0


def test_compare_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="differ in length"):
        compare([True, False], [True], ["a", "a"])
    with pytest.raises(ValueError, match="no questions"):
        compare([], [], [])


def test_pair_rows_matches_questions_by_subject_and_index():
    base = [{"subject": "a", "index": 0, "correct": True}, {"subject": "a", "index": 1, "correct": False},
            {"subject": "b", "index": 0, "correct": True}]
    tuned = [{"subject": "b", "index": 0, "correct": False}, {"subject": "a", "index": 0, "correct": True}]
    assert pair_rows(base, tuned) == ([True, True], [True, False], ["a", "b"])


def test_regression_stage_computes_caches_and_skips_without_a_tuned_run(tmp_path):
    settings = SimpleNamespace(seed=0, stages=("regression",))
    cache = StageCache(tmp_path / "stages")
    rows = lambda flags: {"rows": [{"subject": "s", "index": i, "correct": f} for i, f in enumerate(flags)]}  # noqa: E731
    base, tuned = _pairs(both=10, lost=6, gained=0, neither=4)
    result = regression_stage(settings, cache, rows(base), rows(tuned))
    assert (result["b"], result["c"]) == (6, 0)
    assert (tmp_path / "stages" / "regression.json").exists()
    assert regression_stage(settings, cache, rows(base), None) is None
    skipped = SimpleNamespace(seed=0, stages=())
    assert regression_stage(skipped, cache, rows(base), rows(tuned)) == result  # reused from the cache
