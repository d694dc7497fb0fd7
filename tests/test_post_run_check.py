"""scripts/test.py, the users' post-run check, on results files the tests write: the MMLU rule and the skip."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_check(results_dir: Path, *pytest_args: str) -> str:
    """pytest scripts/test.py against results_dir; its summary output."""
    env = {**os.environ, "RESULTS_DIR": str(results_dir), "MAX_MMLU_DROP": "2.0"}
    done = subprocess.run([sys.executable, "-m", "pytest", "scripts/test.py", "-q", "-rsw", "-p", "no:cacheprovider",
                           *pytest_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def write_results(results_dir: Path, base: float, tuned: float, significant: bool) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps({
        "best_adapter": "results/run/adapter",
        "baseline": {"mmlu": {"accuracy": base}},
        "best_mmlu": {"accuracy": tuned},
        "regression": {"n": 30, "significant": significant, "verdict": "a verdict."},
    }))


@pytest.mark.parametrize("base, tuned, significant, expected", [
    (0.30, 0.29, True, "1 passed"),  # 1 point: within MAX_MMLU_DROP
    (0.30, 0.2667, False, "1 passed"),  # 3.3 points, but noise: passes with a warning
    (0.50, 0.40, True, "1 failed"),  # 10 points and significant
])
def test_mmlu_drop_rule(tmp_path, base, tuned, significant, expected):
    write_results(tmp_path, base, tuned, significant)
    out = run_check(tmp_path, "-k", "mmlu_drop")
    assert expected in out, out
    assert ("the paired test calls it noise" in out) == (not significant and base - tuned > 0.02), out


def test_no_run_skips_with_the_reason(tmp_path):
    out = run_check(tmp_path)
    assert "skipped" in out and "no run found" in out and "failed" not in out, out
