"""The user's post-run check: `pytest scripts/test.py` after `python main.py` (reads results/ and the store).

Thresholds come from the environment (or .env): MIN_EX (default 0.0), MAX_MMLU_DROP in points (default 2.0; a
larger drop fails when the exact McNemar test of the regression analysis calls it significant, and only warns
when it calls it noise, as with the demo's 30 questions, where one question is 3.3 points),
LIVE_SAMPLE (default 8 examples of the first evaluation set regenerated live), LIVE_MIN_AGREEMENT (default 0.75).
With SELECT_ADAPTER_ON=voted the EX checks use the voted EX (of the first evaluation set). RESULTS_DIR and
DB_PATH point at another run. Not part of CI: it checks a real run's outputs.

A threshold that is not a number in its range stops the check with one line naming it (exit status 4); a skipped
check prints its reason at the end, with or without -rs.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import NoReturn

import pytest
from dotenv import load_dotenv

load_dotenv(".env")
BAD_THRESHOLDS: list[str] = []  # 'KEY=value: expected ...' for each threshold that is not a number in its range


def threshold(name: str, default: str, low: float, high: float | None = None, integer: bool = False) -> float:
    """A threshold from the environment (or .env); a bad one is noted (the check stops on it) and its default used."""
    text = os.environ.get(name, "").strip() or default
    try:
        value = int(text) if integer else float(text)
        good = math.isfinite(value) and value >= low and (high is None or value <= high)
    except ValueError:
        good = False
    if good:
        return value
    bounds = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
    BAD_THRESHOLDS.append(f"{name}={text}: expected {'an integer' if integer else 'a number'} {bounds}")
    return int(default) if integer else float(default)


RESULTS_DIR = Path(os.environ.get("RESULTS_DIR", "results"))
DB_PATH = Path(os.environ.get("DB_PATH", RESULTS_DIR / "results.sqlite"))
MIN_EX = threshold("MIN_EX", "0.0", 0, 1)
MAX_MMLU_DROP = threshold("MAX_MMLU_DROP", "2.0", 0, 100)
LIVE_SAMPLE = threshold("LIVE_SAMPLE", "8", 1, integer=True)
LIVE_MIN_AGREEMENT = threshold("LIVE_MIN_AGREEMENT", "0.75", 0, 1)


class SkipReasons:
    """Why checks were skipped, printed at the end of the run: pytest itself lists skip reasons only with -rs."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        """Each reason once, unless -rs lists them already."""
        if not terminalreporter.hasopt("skipped"):
            for reason in dict.fromkeys(self.reasons):
                terminalreporter.write_line(reason, yellow=True, bold=True)


SKIP_REASONS = SkipReasons()


@pytest.fixture(scope="module", autouse=True)
def skip_reasons(request: pytest.FixtureRequest) -> SkipReasons:
    """SKIP_REASONS, registered so that the terminal summary prints them."""
    if not request.config.pluginmanager.is_registered(SKIP_REASONS):
        request.config.pluginmanager.register(SKIP_REASONS, "post-run-check-skip-reasons")
    return SKIP_REASONS


def skip(reason: str) -> NoReturn:
    """Skip the check, with the reason in the summary."""
    SKIP_REASONS.reasons.append(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def results() -> dict:
    """results/results.json of the last run, or skip with the reason; a bad threshold stops the check first."""
    if BAD_THRESHOLDS:
        problems = "; ".join(BAD_THRESHOLDS)
        pytest.exit(f"{problems} (from the environment or .env)", returncode=pytest.ExitCode.USAGE_ERROR)
    path = RESULTS_DIR / "results.json"
    if not path.exists():
        skip(f"no run found: {path} does not exist; run `python main.py` (or `python main.py --demo`) first")
    data = json.loads(path.read_text())
    if not data.get("best_adapter"):
        skip(f"{path} has no trained adapter yet; run the train and eval_adapters stages")
    return data


def best_run(results: dict) -> dict:
    """The run whose adapter was chosen as best."""
    return next(r for r in results["runs"].values() if r["adapter_dir"] == results["best_adapter"])


def selected_ex(results: dict, ex: dict) -> float:
    """The EX the best adapter was chosen on: greedy, or voted with SELECT_ADAPTER_ON=voted."""
    return ex["voted"]["ex"] if results["settings"].get("select_adapter_on") == "voted" else ex["ex"]


def test_best_adapter_beats_the_baseline(results: dict) -> None:
    base, best = selected_ex(results, results["baseline"]["ex"]), selected_ex(results, best_run(results)["ex"])
    assert best > base, f"fine-tuned EX {best:.3f} is not above the baseline's {base:.3f}"


def test_best_adapter_reaches_min_ex(results: dict) -> None:
    best = selected_ex(results, best_run(results)["ex"])
    assert best >= MIN_EX, f"fine-tuned EX {best:.3f} is under MIN_EX={MIN_EX}"


def test_mmlu_drop_is_bounded(results: dict) -> None:
    """Fails on a drop over MAX_MMLU_DROP that the paired test calls significant; a larger drop it calls noise warns."""
    base, tuned, analysis = results["baseline"]["mmlu"], results["best_mmlu"], results.get("regression") or {}
    if not base or not tuned:
        skip("MMLU check skipped: the MMLU stages were not run")
    drop = 100 * (base["accuracy"] - tuned["accuracy"])
    if drop <= MAX_MMLU_DROP:
        return
    verdict = analysis.get("verdict", "no regression analysis")
    assert analysis.get("significant") is False, f"MMLU fell {drop:.1f} points (> MAX_MMLU_DROP={MAX_MMLU_DROP}): {verdict}"
    warnings.warn(f"MMLU fell {drop:.1f} points (> MAX_MMLU_DROP={MAX_MMLU_DROP}), but on {analysis.get('n')} "
                  f"questions the paired test calls it noise: {verdict} Evaluate more MMLU questions to decide.")


def test_store_holds_every_answer(results: dict) -> None:
    if not DB_PATH.exists():
        skip(f"store check skipped: no results store at {DB_PATH}")
    from scripts.store import ResultsStore

    evaluated = len(Path(results["eval_sets"][0]["evaluated_file"]).read_text().splitlines())  # the first set's
    with ResultsStore(DB_PATH) as store:
        for name in ("baseline", "best"):
            ex = results["baseline"]["ex"] if name == "baseline" else best_run(results)["ex"]
            rows = store.sql_rows(ex["run_id"])
            assert len(rows) == evaluated, f"{name}: {len(rows)} stored answers for {evaluated} evaluated examples"
            assert all(r["raw_output"] is not None for r in rows), f"{name}: answers without raw model output"
            if ex.get("voted"):  # execution-guided voting: every candidate stored, executed, and one vote per answer
                config = {k: ex["voted"][k] for k in ("n", "temperature", "top_p", "seed")}
                candidates = store.candidate_rows(ex["run_id"], config)
                assert len(candidates) == evaluated * config["n"], f"{name}: {len(candidates)} stored candidates"
                assert all(c["error"] is not None for c in candidates), f"{name}: candidates never executed"
                assert len(store.vote_rows(ex["run_id"], config)) == evaluated, f"{name}: votes missing"


def test_live_regeneration_matches_store_and_references(results: dict) -> None:
    """Load the best adapter, regenerate SQL for a sample, compare with what was stored and with the gold."""
    outcome = regenerate_sample(results, DB_PATH, LIVE_SAMPLE)
    assert outcome["agreement"] >= LIVE_MIN_AGREEMENT, f"live SQL differs from the stored SQL: {outcome}"
    assert outcome["live_correct"] >= outcome["stored_correct"] - 1, f"live answers are worse than stored: {outcome}"


def regenerate_sample(results: dict, db_path: Path, n: int) -> dict:
    """Reload the best adapter, regenerate SQL for n stored examples of the first set; agreement with the store, EX."""
    import random

    from scripts.answers import build_prompts, extract_answers, score
    from scripts.databases import SpiderLayout
    from scripts.generation import generate
    from scripts.models import load_for_evaluation
    from scripts.store import ResultsStore

    s = results["settings"]
    with ResultsStore(db_path) as store:
        stored = [r for r in store.sql_rows(best_run(results)["ex"]["run_id"]) if r["correct"] is not None]
    sample = random.Random(s["seed"]).sample(stored, min(n, len(stored)))
    examples = [{"db_id": r["db_id"], "question": r["question"], "query": r["gold_sql"]} for r in sample]
    first = results["eval_sets"][0]  # the set the best adapter was chosen on, and its databases
    layout = SpiderLayout(Path(first["database_dir"]), Path(first["database_dir"]),
                          Path(first["tables_file"]) if first.get("tables_file") else None)
    model, tokenizer = load_for_evaluation(s["base_model_id"], results["best_adapter"], s["quantization"],
                                           s.get("eval_precision", "4bit"), token=os.environ.get("HF_TOKEN"))
    prompts = build_prompts(tokenizer, examples, layout, s["schema_sample_rows"])
    texts = generate(model, tokenizer, prompts, batch_size=s["eval_batch_size"], max_new_tokens=s["max_new_tokens"])
    sqls = [x.sql for x in extract_answers(texts, examples, layout)]
    live = score(examples, sqls, layout, timeout=s["sql_timeout_s"])["per_example"]
    return {
        "n": len(sample),
        "agreement": sum(a == r["extracted_sql"] for a, r in zip(sqls, sample)) / max(1, len(sample)),
        "live_correct": sum(bool(r["correct"]) for r in live),
        "stored_correct": sum(bool(r["correct"]) for r in sample),
    }
