"""What `pytest scripts/test.py` tells the user without -rs: why it skipped, and which threshold is bad."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOOD_THRESHOLDS = {"MIN_EX": "0.0", "MAX_MMLU_DROP": "2.0", "LIVE_SAMPLE": "8", "LIVE_MIN_AGREEMENT": "0.75"}


def post_run_check(results_dir: Path, **thresholds: str) -> subprocess.CompletedProcess:
    """`pytest scripts/test.py` as the user types it (no -rs) against results_dir, with these thresholds."""
    env = {k: v for k, v in os.environ.items() if k != "DB_PATH"}
    env.update(GOOD_THRESHOLDS, RESULTS_DIR=str(results_dir), **thresholds)
    return subprocess.run([sys.executable, "-m", "pytest", "scripts/test.py", "-p", "no:cacheprovider"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_no_run_says_why_it_skipped(tmp_path: Path) -> None:
    done = post_run_check(tmp_path)
    reason = (f"no run found: {tmp_path / 'results.json'} does not exist; "
              "run `python main.py` (or `python main.py --demo`) first")
    assert done.returncode == 0, done.stdout + done.stderr
    assert reason in done.stdout.splitlines(), done.stdout
    assert "5 skipped" in done.stdout


def test_bad_min_ex_is_one_line_naming_it(tmp_path: Path) -> None:
    done = post_run_check(tmp_path, MIN_EX="abc")
    out = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, out
    (line,) = [line for line in out.splitlines() if "MIN_EX" in line]
    assert "MIN_EX=abc: expected a number between 0 and 1" in line
    assert "Traceback" not in out and "ValueError" not in out and "passed" not in out


def test_every_bad_threshold_is_named(tmp_path: Path) -> None:
    bad = {"MIN_EX": "1.5", "MAX_MMLU_DROP": "-1", "LIVE_SAMPLE": "2.5", "LIVE_MIN_AGREEMENT": "nan"}
    done = post_run_check(tmp_path, **bad)
    out = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, out
    for expected in ("MIN_EX=1.5: expected a number between 0 and 1", "MAX_MMLU_DROP=-1: expected a number between 0 "
                     "and 100", "LIVE_SAMPLE=2.5: expected an integer >= 1", "LIVE_MIN_AGREEMENT=nan: expected a number"):
        assert expected in out, expected
    assert "Traceback" not in out
