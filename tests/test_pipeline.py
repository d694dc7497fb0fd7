"""The whole pipeline through main.py on a tiny in-process model and the bundled demo data.

Every stage runs for real (unpack, generation, SQL execution, MMLU scoring, LoRA training, regression, report);
the model loader, the SQL generator, the EX scorer and the MMLU scorer are only wrapped, to count what each run
does and to interrupt it. Covered: the outputs of a full run; a rerun that redoes nothing; retraining alone
(`--stages train --force`) and then a rerun that redoes only what depends on the new adapters; --force that
redoes everything; an interrupted run (during generation, during scoring) that resumes where it stopped and ends
with the uninterrupted run's results; user errors (exit status 2, a message that names the fix).
"""
import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import main
import scripts.answers
import scripts.evaluate
import scripts.export
import scripts.mmlu
import scripts.models
from scripts.demo_data import build_demo_data
from scripts.settings import ENV_KEYS
from tests.tiny_models import save_tiny_model

N_EVAL = 10  # Spider dev examples
BATCH = 4  # generation batch: 4 + 4 + 2
N_MMLU = 3 * 3  # 3 demo subjects x 3 questions
REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_CONFIGS = [
    {"learning_rate": 1e-2, "max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
     "max_length": 1024, "gradient_checkpointing": False, "logging_steps": 1},
    {"learning_rate": 5e-3, "max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
     "max_length": 1024, "gradient_checkpointing": False, "logging_steps": 1},
]
PLOTS = ("ex_per_config.png", "loss_curves.png", "mmlu_delta_per_subject.png")
STAGE_FILES = ("baseline_ex@spider_dev", "baseline_mmlu", "preprocess", "mmlu_best", "regression")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The demo's Spider zip and MMLU folder, and a tiny chat model saved as a local folder (shared, read-only)."""
    root = tmp_path_factory.mktemp("inputs")
    spider_zip, mmlu_dir = build_demo_data(root / "demo")
    return {"model": save_tiny_model(root / "model", kind="chatml"), "zip": spider_zip, "mmlu": mmlu_dir}


def argv(root, inputs, *extra: str) -> list[str]:
    """A full pipeline command with every output under root (and an empty .env file)."""
    (root / "empty.env").write_text("")
    return [
        "--model", str(inputs["model"]), "--spider-zip", str(inputs["zip"]), "--mmlu", str(inputs["mmlu"]),
        "--results-dir", str(root / "results"), "--db-path", str(root / "store" / "results.sqlite"),
        "--sample-size-eval", str(N_EVAL), "--sample-size-train", "12", "--mmlu-per-subject", "3",
        "--eval-batch-size", str(BATCH), "--max-new-tokens", "24", "--quantization", "none",
        "--training-configs", json.dumps(TRAINING_CONFIGS), "--env-file", str(root / "empty.env"), *extra,
    ]


class Probe:
    """Wraps the model loader, the SQL generator and the MMLU scorer to count what a run does (and interrupt it).

    interrupt="generation": KeyboardInterrupt after the first generated batch of the first adapter;
    interrupt="scoring": KeyboardInterrupt while scoring the first adapter's answers (all of them stored).
    """

    def __init__(self, monkeypatch, interrupt: str | None = None) -> None:
        self.loads: list[dict] = []  # {"adapter", "for_training", "export"} per model load
        self.exports = 0  # merges of the export stage (each loads the base model and merges the adapter in)
        self.exporting = False  # while the export stage merges: its load is not counted as a base-model load
        self.generated = 0  # SQL answers generated
        self.generated_by_adapter = 0
        self.mmlu_scored = 0  # MMLU questions scored
        self.interrupt = interrupt
        real_load, real_generate, real_score, real_mmlu, real_merge = (
            scripts.models.load_model_and_tokenizer, scripts.answers.generate, scripts.evaluate.score,
            scripts.mmlu.evaluate_mmlu, scripts.export.merged_model)

        def load(model_id, **kwargs):
            self.loads.append({"adapter": kwargs.get("adapter"), "for_training": kwargs.get("for_training", False),
                               "export": self.exporting})
            return real_load(model_id, **kwargs)

        def merged_model(*args, **kwargs):
            self.exports += 1
            self.exporting = True
            try:
                return real_merge(*args, **kwargs)
            finally:
                self.exporting = False

        def generate(model, tokenizer, prompts, *, done=None, **kwargs):
            with_adapter = hasattr(model, "peft_config")

            def counted(indices, texts, seconds):
                self.generated += len(indices)
                self.generated_by_adapter += len(indices) if with_adapter else 0
                done(indices, texts, seconds)
                if with_adapter and self.interrupt == "generation":
                    self.interrupt = None
                    raise KeyboardInterrupt

            texts = real_generate(model, tokenizer, prompts, done=counted, **kwargs)
            if with_adapter and self.interrupt == "scoring":
                self.interrupt = "now"
            return texts

        def score(*args, **kwargs):
            if self.interrupt == "now":
                self.interrupt = None
                raise KeyboardInterrupt
            return real_score(*args, **kwargs)

        def evaluate_mmlu(model, tokenizer, questions, *args, **kwargs):
            self.mmlu_scored += len(questions)
            return real_mmlu(model, tokenizer, questions, *args, **kwargs)

        monkeypatch.setattr(scripts.models, "load_model_and_tokenizer", load)
        monkeypatch.setattr(scripts.answers, "generate", generate)
        monkeypatch.setattr(scripts.evaluate, "score", score)
        monkeypatch.setattr(scripts.mmlu, "evaluate_mmlu", evaluate_mmlu)
        monkeypatch.setattr(scripts.export, "merged_model", merged_model)

    @property
    def training_loads(self) -> int:
        return sum(load["for_training"] for load in self.loads)

    @property
    def base_loads(self) -> int:
        return sum(not load["for_training"] and load["adapter"] is None and not load["export"] for load in self.loads)


def run_main(root, inputs, monkeypatch, *extra: str, interrupt: str | None = None) -> tuple[int, Probe]:
    """main.main in root (relative paths such as data/spider_data land there); no .env or environment leaks in."""
    with monkeypatch.context() as m:
        m.chdir(root)
        for key in ENV_KEYS:
            m.delenv(key, raising=False)
        probe = Probe(m, interrupt)
        return main.main(argv(root, inputs, *extra)), probe


def store_dump(root) -> dict:
    """Every row of the results store's three tables, in a stable order."""
    con = sqlite3.connect(root / "store" / "results.sqlite")
    con.row_factory = sqlite3.Row
    try:
        runs = [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY id")]
        sql = [dict(r) for r in con.execute("SELECT * FROM sql_results ORDER BY run_id, example_key")]
        mmlu = [dict(r) for r in con.execute("SELECT * FROM mmlu_results ORDER BY run_id, subject, question_index")]
    finally:
        con.close()
    return {"runs": runs, "sql": sql, "mmlu": mmlu}


def comparable(root) -> dict:
    """What must not change between equivalent runs: results.json without times and paths, and the stored answers
    behind it (generated SQL, its score, MMLU predictions and log-likelihoods).

    Training runs and their adapters are named by order (run0, run1): their names hash the run's own paths.
    """
    results = json.loads((root / "results" / "results.json").read_text())
    names = {name: f"run{i}" for i, name in enumerate(results["runs"])}
    adapters = {run["adapter_dir"]: names[name] for name, run in results["runs"].items()}
    volatile = {"seconds", "run_id", "created", "train_seconds", "session_seconds", "tokens_per_second", "peak_memory_gb"}

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in volatile}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return adapters.get(value, value) if isinstance(value, str) else value

    dump = store_dump(root)
    reported = {results["baseline"]["ex"]["run_id"]: "baseline_ex",
                results["baseline"]["mmlu"]["run_id"]: "baseline_mmlu",
                results["best_mmlu"]["run_id"]: "mmlu_best",
                **{run["ex"]["run_id"]: f"ex_{names[name]}" for name, run in results["runs"].items()}}
    answers = {(reported[r["run_id"]], r["example_key"]): (r["raw_output"], r["extracted_sql"], r["correct"], r["error"])
               for r in dump["sql"] if r["run_id"] in reported}
    mmlu = {(reported[r["run_id"]], r["subject"], r["question_index"]):
            (r["prediction"], r["correct"], json.loads(r["loglikelihoods"]))
            for r in dump["mmlu"] if r["run_id"] in reported}
    assert len(answers) == 3 * N_EVAL and len(mmlu) == 2 * N_MMLU
    return {
        "baseline": clean(results["baseline"]),
        "runs": [clean({k: v for k, v in run.items() if k != "adapter_dir"}) for run in results["runs"].values()],
        "best_adapter": adapters[results["best_adapter"]],
        "best_mmlu": clean(results["best_mmlu"]),
        "regression": results["regression"],
        "answers": answers,
        "mmlu": mmlu,
    }


@pytest.fixture(scope="module")
def full_run(inputs, tmp_path_factory):
    """One uninterrupted run of every stage; what it wrote is snapshotted right after it, for the tests to read."""
    root = tmp_path_factory.mktemp("full")
    with pytest.MonkeyPatch.context() as monkeypatch:
        status, probe = run_main(root, inputs, monkeypatch)
    assert status == 0
    return {"root": root, "probe": probe, "results": json.loads((root / "results" / "results.json").read_text()),
            "report": (root / "results" / "report.md").read_text(), "store": store_dump(root),
            "comparable": comparable(root)}


def test_full_run_writes_report_results_store_adapters_and_plots(full_run):
    root, results, report, store, probe = (full_run[k] for k in ("root", "results", "report", "store", "probe"))
    out = root / "results"

    # every stage ran once: one base-model load shared by the baseline stages and pre-processing, one load per
    # training run, one per adapter evaluation, one for the export's merge; every dev example generated 3 times; MMLU
    # for base and best
    assert probe.base_loads == 1 and probe.training_loads == 2 and probe.exports == 1
    assert probe.generated == 3 * N_EVAL and probe.generated_by_adapter == 2 * N_EVAL
    assert probe.mmlu_scored == 2 * N_MMLU

    # results.json: baseline and per-adapter EX and MMLU, the best adapter, the regression analysis
    base_ex, base_mmlu = results["baseline"]["ex"], results["baseline"]["mmlu"]
    assert base_ex["count"] == N_EVAL and 0 <= base_ex["ex"] <= 1
    base_rows = [r for r in store["sql"] if r["run_id"] == base_ex["run_id"]]  # answers without SQL are counted
    assert base_ex["extraction"]["answers"] == N_EVAL
    assert base_ex["extraction"]["no_sql"] == sum(not r["extracted_sql"] for r in base_rows)
    assert set(base_ex["by_hardness"]) <= {"easy", "medium", "hard", "extra"}
    assert base_mmlu["count"] == N_MMLU and 0 <= base_mmlu["accuracy"] <= 1 and len(base_mmlu["by_subject"]) == 3
    assert "rows" not in base_mmlu  # per-question rows live in the store
    assert len(results["runs"]) == 2
    for (name, run), config in zip(results["runs"].items(), TRAINING_CONFIGS):
        assert {k: run["config"][k] for k in config} == config
        assert run["training"]["steps"] == config["max_steps"] and run["training"]["loss_start"] is not None
        assert run["ex"]["count"] == N_EVAL and 0 <= run["ex"]["ex"] <= 1
        assert run["ex"]["adapter"] == run["adapter_dir"]
        adapter = out / name / "adapter"
        assert run["adapter_dir"] == str(adapter)
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        assert json.loads((out / name / "training_log.json").read_text())["completed"] is True
    best = max(results["runs"].values(), key=lambda r: r["ex"]["ex"])  # the first on a tie
    assert results["best_adapter"] == best["adapter_dir"]
    assert results["best_mmlu"]["adapter"] == best["adapter_dir"] and results["best_mmlu"]["count"] == N_MMLU
    regression = results["regression"]
    assert regression["n"] == N_MMLU and regression["base_accuracy"] == base_mmlu["accuracy"]
    assert regression["tuned_accuracy"] == results["best_mmlu"]["accuracy"]
    assert regression["verdict"].startswith("MMLU ")
    assert results["settings"]["sample_size_eval"] == N_EVAL and not results["settings"]["hf_token_set"]

    # report.md: one table row per model with its EX and MMLU, the verdict, the plots
    assert f"| baseline | {100 * base_ex['ex']:.1f} |" in report and f"| {100 * base_mmlu['accuracy']:.1f} |" in report
    for name, run in results["runs"].items():
        label = name + (" (best)" if run["adapter_dir"] == results["best_adapter"] else "")
        assert f"| {label} | {100 * run['ex']['ex']:.1f} |" in report
    assert report.count("(best)") == 1 and regression["verdict"] in report
    for plot in PLOTS:
        assert f"]({plot})" in report
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the store: one row per (run, example) and per (run, question), answers scored, summaries agree with it
    evaluated = [json.loads(line) for line in (out / "eval_sets" / "spider_dev.jsonl").read_text().splitlines()]
    eval_keys = [f"{e['db_id']}::{e['question']}" for e in evaluated]
    assert len(eval_keys) == N_EVAL == len(set(eval_keys))
    runs = {run["kind"]: run for run in store["runs"]}
    assert sorted(runs) == sorted(["baseline_ex@spider_dev", "baseline_mmlu", "mmlu_best",
                                   *(f"ex_{n}@spider_dev" for n in results["runs"])])
    assert len(store["runs"]) == 5
    ex_of = {"baseline_ex@spider_dev": base_ex,
             **{f"ex_{name}@spider_dev": run["ex"] for name, run in results["runs"].items()}}
    for kind, summary in ex_of.items():
        rows = [r for r in store["sql"] if r["run_id"] == runs[kind]["id"]]
        assert sorted(r["example_key"] for r in rows) == sorted(eval_keys)  # each example once, no duplicates
        assert all(r["raw_output"] is not None and r["correct"] in (0, 1) and r["error"] for r in rows)
        assert summary["run_id"] == runs[kind]["id"]
        assert sum(r["correct"] for r in rows) / N_EVAL == summary["ex"]
    assert runs[f"ex_{next(iter(results['runs']))}@spider_dev"]["adapter"].endswith("adapter")
    for kind, summary in (("baseline_mmlu", base_mmlu), ("mmlu_best", results["best_mmlu"])):
        rows = [r for r in store["mmlu"] if r["run_id"] == runs[kind]["id"]]
        assert len(rows) == N_MMLU == len({(r["subject"], r["question_index"]) for r in rows})
        assert summary["run_id"] == runs[kind]["id"]
        assert sum(r["correct"] for r in rows) / N_MMLU == summary["accuracy"]
    assert len(store["sql"]) == 3 * N_EVAL and len(store["mmlu"]) == 2 * N_MMLU

    # the saved stage results a rerun reuses, and the data sets
    for name in STAGE_FILES + tuple(f"ex_{n}@spider_dev" for n in results["runs"]):
        assert (out / "stages" / f"{name}.json").is_file()
    assert len((out / "train_chat.jsonl").read_text().splitlines()) >= 2
    assert (root / "data" / "spider_data" / "spider_data" / "dev.json").is_file()  # stage 1 unpacked the zip here


def test_post_run_check_reads_the_store_and_regenerates_the_best_adapters_answers(full_run):
    """`pytest scripts/test.py` on this run: every answer stored, and a live regeneration that matches the store."""
    root = full_run["root"]
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(RESULTS_DIR=str(root / "results"), DB_PATH=str(root / "store" / "results.sqlite"), LIVE_SAMPLE="4",
               LIVE_MIN_AGREEMENT="1.0")
    done = subprocess.run([sys.executable, "-m", "pytest", "scripts/test.py", "-q", "-p", "no:cacheprovider",
                           "-k", "store or live"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_export_is_the_best_adapter_merged_with_the_runs_figures_on_its_card(full_run):
    """RESULTS_DIR/export: a folder plain transformers loads, the best adapter beside it, results.json's figures."""
    from transformers import AutoModelForCausalLM

    results, out = full_run["results"], full_run["root"] / "results" / "export"
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    best = next(run for run in results["runs"].values() if run["adapter_dir"] == results["best_adapter"])
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (Path(results["best_adapter"]) / "adapter_model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    base_ex, base_mmlu = results["baseline"]["ex"], results["baseline"]["mmlu"]
    assert (f"| EX `spider_dev`, greedy (n = {N_EVAL}) | {100 * base_ex['ex']:.1f} % | {100 * best['ex']['ex']:.1f} % |"
            in card)
    assert (f"| MMLU (n = {N_MMLU}) | {100 * base_mmlu['accuracy']:.1f} % | "
            f"{100 * results['best_mmlu']['accuracy']:.1f} % |" in card)
    assert results["regression"]["verdict"] in card and json.dumps(best["config"]["learning_rate"]) in card
    saved = json.loads((full_run["root"] / "results" / "stages" / "export.json").read_text())["result"]
    assert saved["adapter"] == results["best_adapter"] and saved["folder"] == str(out)


def test_rerun_redoes_nothing_retraining_redoes_what_depends_on_it_and_force_redoes_everything(
        full_run, inputs, monkeypatch):
    root = full_run["root"]
    adapters = [root / "results" / n / "adapter" / "adapter_model.safetensors" for n in full_run["results"]["runs"]]
    report = root / "results" / "report.md"

    def stamps():
        return [p.stat().st_mtime_ns for p in adapters]

    # the same command again: every stage's result is reused
    first = stamps()
    status, probe = run_main(root, inputs, monkeypatch)
    assert status == 0
    assert probe.loads == [] and probe.exports == 0 and probe.generated == 0 and probe.mmlu_scored == 0
    assert store_dump(root) == full_run["store"]  # not a row added or rewritten
    assert stamps() == first  # no adapter retrained
    assert comparable(root) == full_run["comparable"]

    # retrain alone (the other stages' saved results are still used, e.g. the pre-processed data set)
    report_before = report.stat().st_mtime_ns
    status, probe = run_main(root, inputs, monkeypatch, "--stages", "train", "--force")
    assert status == 0
    assert probe.training_loads == 2 and probe.base_loads == 0 and probe.generated == 0 and probe.mmlu_scored == 0
    retrained = stamps()
    assert all(a != b for a, b in zip(retrained, first)) and report.stat().st_mtime_ns == report_before

    # then the whole command: what depends on the new adapters is redone, the baseline is not
    status, probe = run_main(root, inputs, monkeypatch)
    assert status == 0
    assert probe.base_loads == 0 and probe.training_loads == 0
    assert probe.exports == 1  # the best adapter's new weights, exported again
    assert probe.generated == probe.generated_by_adapter == 2 * N_EVAL
    assert probe.mmlu_scored == N_MMLU  # the best adapter's new weights, not its old stored answers
    assert stamps() == retrained
    assert comparable(root) == full_run["comparable"]  # deterministic training: the same results

    # --force: every stage again, every answer generated again
    status, probe = run_main(root, inputs, monkeypatch, "--force")
    assert status == 0
    assert probe.base_loads == 1 and probe.training_loads == 2 and probe.exports == 1
    assert probe.generated == 3 * N_EVAL and probe.mmlu_scored == 2 * N_MMLU
    assert all(a != b for a, b in zip(stamps(), retrained))
    assert comparable(root) == full_run["comparable"]
    dump = store_dump(root)
    base_runs = [r for r in dump["runs"] if r["adapter"] == ""]
    assert base_runs == [r for r in full_run["store"]["runs"] if r["adapter"] == ""]  # baseline rows rewritten in place
    for run in dump["runs"]:  # one row per example / question and run, every run complete
        keys = [r["example_key"] for r in dump["sql"] if r["run_id"] == run["id"]]
        questions = [(r["subject"], r["question_index"]) for r in dump["mmlu"] if r["run_id"] == run["id"]]
        if "mmlu" in run["kind"]:
            assert len(questions) == len(set(questions)) == N_MMLU and not keys
        else:
            assert len(keys) == len(set(keys)) == N_EVAL and not questions


@pytest.mark.parametrize("interrupt", ["generation", "scoring"])
def test_interrupted_run_resumes_where_it_stopped(full_run, inputs, tmp_path, monkeypatch, caplog, interrupt):
    out = tmp_path / "results"
    stored_before_stop = BATCH if interrupt == "generation" else N_EVAL  # first adapter's answers in the store

    status, probe = run_main(tmp_path, inputs, monkeypatch, interrupt=interrupt)
    assert status == 130 and "rerun the same command to resume" in caplog.text
    assert probe.generated_by_adapter == stored_before_stop and probe.generated == N_EVAL + stored_before_stop
    assert probe.mmlu_scored == N_MMLU and probe.training_loads == 2
    for name in ("baseline_ex@spider_dev", "baseline_mmlu", "preprocess"):
        assert (out / "stages" / f"{name}.json").is_file()
    assert not list((out / "stages").glob("ex_*.json")) and not (out / "report.md").exists()
    stored = store_dump(tmp_path)
    first_adapter = next(r for r in stored["runs"] if r["kind"].startswith("ex_"))
    partial = [r for r in stored["sql"] if r["run_id"] == first_adapter["id"]]
    assert len(partial) == stored_before_stop
    assert all(r["raw_output"] is not None and r["correct"] is None for r in partial)  # generated, not scored yet

    status, probe = run_main(tmp_path, inputs, monkeypatch)
    assert status == 0
    assert probe.training_loads == 0 and probe.base_loads == 0  # trained runs and base-model stages not redone
    assert probe.exports == 1  # the interrupted run stopped before the export
    assert probe.generated == probe.generated_by_adapter == 2 * N_EVAL - stored_before_stop  # only what was missing
    assert probe.mmlu_scored == N_MMLU  # the best adapter's MMLU, nothing of the baseline
    assert comparable(tmp_path) == full_run["comparable"]  # the uninterrupted run's results
    dump = store_dump(tmp_path)
    assert len(dump["runs"]) == 5 and len(dump["sql"]) == 3 * N_EVAL and len(dump["mmlu"]) == 2 * N_MMLU


def test_answers_other_processes_spooled_before_an_interruption_are_recovered(full_run, inputs, tmp_path,
                                                                               monkeypatch, caplog):
    """Under accelerate launch the other processes spool their answers (the main process alone writes the store):
    after an interruption, the next run moves them into the store instead of generating or scoring them again."""
    from scripts.store import ResultsStore, Spool

    with ResultsStore(full_run["root"] / "store" / "results.sqlite") as store:
        runs = {r["kind"]: r["id"] for r in store.runs()}
        sql, mmlu = store.sql_rows(runs["baseline_ex@spider_dev"]), store.mmlu_rows(runs["baseline_mmlu"])
    db = tmp_path / "store" / "results.sqlite"
    # a fresh store numbers the runs in stage order, as the full run did
    sql_spool, mmlu_spool = Spool(db, "sql", runs["baseline_ex@spider_dev"]), Spool(db, "mmlu", runs["baseline_mmlu"])
    sql_spool.append(1, sql[:6])
    mmlu_spool.append(1, mmlu[:5])
    with open(sql_spool.files()[0], "a") as f:
        f.write('{"example_key": "cut off by the interrupt')  # a last line cut in half is left out and redone

    status, probe = run_main(tmp_path, inputs, monkeypatch, "--stages", "data,baseline_ex,baseline_mmlu")
    assert status == 0
    assert probe.generated == N_EVAL - 6 and probe.mmlu_scored == N_MMLU - 5
    assert "1 incomplete line(s) left out" in caplog.text
    assert not sql_spool.files() and not mmlu_spool.files()
    for stage in ("baseline_ex@spider_dev", "baseline_mmlu"):  # the uninterrupted run's results
        ours, theirs = (json.loads((root / "results" / "stages" / f"{stage}.json").read_text())["result"]
                        for root in (tmp_path, full_run["root"]))
        assert {k: v for k, v in ours.items() if k != "seconds"} == {k: v for k, v in theirs.items() if k != "seconds"}


@pytest.mark.parametrize("extra, fix", [
    (("--spider-zip", "nowhere/spider_data.zip"), "set PATH_SPIDER_ZIP (or --spider-zip)"),
    (("--training-configs", '[{"lr": 0.1}]'), "unknown key(s) ['lr']; allowed keys: learning_rate"),
    (("--stages", "train,evaluate"), "unknown stage(s) ['evaluate'] in --stages; choose from data"),
    (("--mmlu", "nowhere/mmlu"), "point PATH_MMLU (or --mmlu) at the MMLU data folder"),
    (("--model", "nowhere/model.gguf"), "no such .gguf file"),
    (("--demo",), "--demo uses the bundled demo data: drop --spider-zip, --mmlu, or drop --demo"),
    (("--stages", "report"), "nothing to report: no stage results under "),
])
def test_user_error_exits_with_status_2_names_the_fix_and_writes_nothing(inputs, tmp_path, monkeypatch, caplog, capsys,
                                                                        extra, fix):
    caplog.set_level(logging.ERROR, logger="main")
    status, probe = run_main(tmp_path, inputs, monkeypatch, *extra)
    assert status == 2
    errors = [r for r in caplog.records if r.name == "main" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and fix in errors[0].getMessage() and errors[0].exc_info is None
    assert "Traceback" not in capsys.readouterr().err
    assert probe.loads == [] and probe.generated == 0 and probe.mmlu_scored == 0
    # every input is checked before anything is written: no results folder, no store, nothing unpacked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.env"]


def _folder_without_a_model(folder: Path, model: Path, holds: str) -> Path:
    """A --model folder that holds no loadable model: nothing, a .gguf file, or a config without weights."""
    folder.mkdir(parents=True)
    if holds == "gguf":
        (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    elif holds == "config":
        (folder / "config.json").write_text((model / "config.json").read_text())
    elif holds == "no tokenizer":
        for name in ("config.json", "model.safetensors"):
            (folder / name).write_bytes((model / name).read_bytes())
    return folder


@pytest.mark.parametrize("holds, fix", [
    ("nothing", "holds no model (no config.json); give a folder saved with save_pretrained"),
    ("gguf", "is the folder that holds SmolLM2-135M-Instruct.Q4_1.gguf: pass the .gguf file itself, e.g. --model "),
    ("config", "has config.json but no weights (*.safetensors or pytorch_model*.bin)"),
    ("no tokenizer", "has no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json, ...)"),
])
def test_model_folder_without_a_model_stops_before_anything_is_written(inputs, tmp_path, monkeypatch, caplog, holds,
                                                                      fix):
    caplog.set_level(logging.ERROR, logger="main")
    folder = _folder_without_a_model(tmp_path / "models" / "m", inputs["model"], holds)
    status, probe = run_main(tmp_path, inputs, monkeypatch, "--model", str(folder))
    errors = [r.getMessage() for r in caplog.records if r.name == "main" and r.levelno == logging.ERROR]
    assert status == 2 and len(errors) == 1 and fix in errors[0], errors
    if holds == "gguf":
        assert str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf") in errors[0]
    assert probe.loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["empty.env", "models"]


def test_read_only_store_stops_before_the_model_loads_and_leaves_no_wal_files(inputs, tmp_path, monkeypatch, caplog):
    from scripts.store import ResultsStore

    caplog.set_level(logging.ERROR, logger="main")
    db = tmp_path / "store" / "results.sqlite"
    with ResultsStore(db):  # an earlier run's store
        pass
    before = db.read_bytes()
    real_open = Path.open

    def read_only(self, mode="r", *args, **kwargs):  # a read-only file, as any user but root meets it
        if self == db and any(c in mode for c in "wax+"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", read_only)
    status, probe = run_main(tmp_path, inputs, monkeypatch, "--stages", "data,baseline_ex")
    errors = [r.getMessage() for r in caplog.records if r.name == "main" and r.levelno == logging.ERROR]
    assert status == 2 and errors == [f"DB_PATH (--db-path) {db} cannot be written (Permission denied); make it "
                                      f"writable (chmod u+w {db}) or give another path"]
    assert probe.loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["empty.env", "store"]
    assert sorted(p.name for p in db.parent.iterdir()) == ["results.sqlite"] and db.read_bytes() == before


def test_report_alone_reports_what_earlier_stages_saved(inputs, tmp_path, monkeypatch):
    status, _ = run_main(tmp_path, inputs, monkeypatch, "--stages", "data,baseline_ex")
    assert status == 0 and not (tmp_path / "results" / "report.md").exists()
    status, probe = run_main(tmp_path, inputs, monkeypatch, "--stages", "report")
    assert status == 0 and probe.loads == [] and probe.generated == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["baseline"]["ex"]["count"] == N_EVAL and results["runs"] == {}


def test_report_alone_with_results_for_other_settings_only_is_a_user_error(inputs, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="main")
    assert run_main(tmp_path, inputs, monkeypatch, "--stages", "data,baseline_ex")[0] == 0
    status, probe = run_main(tmp_path, inputs, monkeypatch, "--stages", "report", "--sample-size-eval", "5")
    assert status == 2 and "nothing to report for these settings" in caplog.text and probe.loads == []
    assert not (tmp_path / "results" / "report.md").exists()


def _without_mmlu_flag(args: list[str]) -> list[str]:
    """The command without --mmlu DIR: MMLU from the Hub's cais/mmlu."""
    i = args.index("--mmlu")
    return args[:i] + args[i + 2:]


def test_mmlu_from_the_hub_offline_and_not_cached_stops_before_anything_is_written(inputs, tmp_path, monkeypatch,
                                                                                  caplog):
    import datasets.config

    caplog.set_level(logging.ERROR, logger="main")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "no-cache")
    monkeypatch.chdir(tmp_path)
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    probe = Probe(monkeypatch)
    status = main.main(_without_mmlu_flag(argv(tmp_path, inputs, "--stages", "data,baseline_mmlu")))
    errors = [r.getMessage() for r in caplog.records if r.name == "main" and r.levelno == logging.ERROR]
    assert status == 2 and len(errors) == 1
    assert "HF_HUB_OFFLINE=1 is set and it is not in the local datasets cache" in errors[0]
    assert "pass --mmlu DIR" in errors[0] and "or go online" in errors[0]
    assert probe.loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["empty.env"]
    # a cached copy (what the datasets library reads offline) passes the check
    (tmp_path / "no-cache" / "cais___mmlu" / "all" / "0.0.0" / "abc123").mkdir(parents=True)
    scripts.mmlu.check_data(SimpleNamespace(stages=("baseline_mmlu",), path_mmlu=None, hf_token=None))


def test_mmlu_from_an_unreachable_hub_fails_fast_through_main(inputs, tmp_path):
    """main.py with the Hub at a closed local port and no --mmlu: exit 2 within seconds, not ~23 s of retries."""
    import socket
    import time

    with socket.socket() as s:  # a local port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", *ENV_KEYS)}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"),
                           *_without_mmlu_flag(argv(tmp_path, inputs, "--stages", "baseline_mmlu"))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    seconds, output = time.perf_counter() - start, done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"the Hugging Face Hub (http://127.0.0.1:{port}) cannot be reached" in output
    assert "to download cais/mmlu: pass --mmlu DIR" in output
    assert "Retrying" not in output and "Traceback" not in output
    assert seconds < 20, f"{seconds:.1f} s to give up on an unreachable Hub"
    assert not (tmp_path / "results").exists() and not (tmp_path / "store").exists()
