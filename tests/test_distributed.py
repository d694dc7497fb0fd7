"""`accelerate launch` with 2 CPU processes gives the same baseline EX and MMLU as one process, and a clean store.

The whole pipeline (tiny in-process model, bundled demo data, 2 training steps) runs twice as a subprocess:
`python main.py ...` and `accelerate launch --multi_gpu --num_processes 2 main.py ...` with ACCELERATE_USE_CPU=true
(two CPU processes on gloo). accelerate's `--cpu --num_processes 2` would not do: without mpirun it starts ONE
process (accelerate 1.15, `simple_launcher`); `--multi_gpu` uses torchrun, which starts both.

What is compared, and why:
- Baseline stages (`baseline_ex@spider_dev`, `baseline_mmlu`): exactly equal, per example — raw model output, extracted SQL,
  correctness, MMLU prediction and log-likelihoods — and so EX, its breakdowns and MMLU accuracy. The model is the
  same in both runs and `--eval-batch-size 1` makes every forward pass the same shape however the examples are split
  between processes (batched left padding could change float rounding, and a random tiny model's near-uniform
  logits would turn that into different greedy tokens). A random model's EX is 0 in both runs, so the per-example
  comparison is what has teeth: an answer lost, doubled or given to the wrong example fails it. The adapter
  stages run this same code.
- Training: two processes are DDP, each step sees twice the examples (so the adapters differ). Checked: the run
  finished the configured steps at twice the epoch of the single-process run; its adapter's EX and MMLU cover every
  example and question; the regression and the report were written.
- The store: the same runs in both, no duplicated (run, example) or (run, question) row, one row per example;
  the second process's spool (its answers kept until the main process has them) is used and left empty.
- Execution-guided voting is on (2 candidates per question): the baseline's sampled candidates, their
  fingerprints and the votes are exactly the same (with batches of one prompt, each is seeded by its index), one
  candidate row per example and index; the adapter's cover every example.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.demo_data import build_demo_data
from tests.tiny_models import save_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 2
CANDIDATES = 2  # execution-guided voting on, so that its candidates are spread and gathered too
TRAINING = [{"max_steps": MAX_STEPS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
             "max_length": 2048, "logging_steps": 1}]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A tiny model folder and the demo data (Spider zip, MMLU folder), shared by both runs."""
    root = tmp_path_factory.mktemp("inputs")
    spider_zip, mmlu_dir = build_demo_data(root / "demo")
    return {"model": save_tiny_model(root / "tiny"), "spider_zip": spider_zip, "mmlu": mmlu_dir}


def free_port() -> int:
    """A TCP port nobody listens on now (for the launch's rendezvous; 29500 may be taken by another run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pipeline(workdir: Path, inputs: dict, processes: int) -> tuple[str, float]:
    """main.py over every stage in workdir (its data/ and results/ land there); (log, seconds)."""
    workdir.mkdir()
    args = [
        str(REPO_ROOT / "main.py"), "--model", str(inputs["model"]), "--spider-zip", str(inputs["spider_zip"]),
        "--mmlu", str(inputs["mmlu"]), "--results-dir", "results", "--db-path", "results/results.sqlite",
        "--sample-size-eval", "24", "--sample-size-train", "16", "--mmlu-per-subject", "6",
        "--eval-batch-size", "1", "--max-new-tokens", "24", "--quantization", "none",
        "--training-configs", json.dumps(TRAINING), "--num-candidates", str(CANDIDATES),
    ]
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        command += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port())]
    start = time.perf_counter()
    done = subprocess.run(command + args, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"{processes} process(es): exit status {done.returncode}\n{log[-6000:]}"
    return log, time.perf_counter() - start


def store_rows(db: Path) -> dict:
    """Per run kind: the SQL rows by example and the MMLU rows by question, with the duplicate checks' counts."""
    conn = sqlite3.connect(db)
    try:
        runs = dict(conn.execute("SELECT id, kind FROM runs").fetchall())
        out = {"kinds": sorted(runs.values()), "sql": {}, "mmlu": {}, "candidates": {}, "votes": {}}
        out["duplicate_runs"] = conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM runs GROUP BY kind, model, adapter, config, data_fingerprint "
            "HAVING COUNT(*) > 1)").fetchone()[0]
        out["duplicate_sql"] = conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM sql_results GROUP BY run_id, example_key "
            "HAVING COUNT(*) > 1)").fetchone()[0]
        out["duplicate_candidates"] = conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM sql_candidates GROUP BY run_id, example_key, sampling, candidate_index "
            "HAVING COUNT(*) > 1)").fetchone()[0]
        out["duplicate_mmlu"] = conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM mmlu_results GROUP BY run_id, subject, question_index "
            "HAVING COUNT(*) > 1)").fetchone()[0]
        for run_id, kind in runs.items():
            sql = conn.execute("SELECT example_key, raw_output, extracted_sql, correct, error FROM sql_results "
                               "WHERE run_id = ? ORDER BY example_key", (run_id,)).fetchall()
            mmlu = conn.execute("SELECT subject, question_index, prediction, correct, loglikelihoods FROM mmlu_results "
                                "WHERE run_id = ? ORDER BY subject, question_index", (run_id,)).fetchall()
            out["sql"][kind], out["mmlu"][kind] = sql, mmlu
            out["candidates"][kind] = conn.execute(
                "SELECT example_key, candidate_index, raw_output, extracted_sql, fingerprint, error FROM sql_candidates "
                "WHERE run_id = ? ORDER BY example_key, candidate_index", (run_id,)).fetchall()
            out["votes"][kind] = conn.execute(
                "SELECT example_key, voted_sql, fingerprint, votes, voters, changed, correct FROM sql_votes "
                "WHERE run_id = ? ORDER BY example_key", (run_id,)).fetchall()
        return out
    finally:
        conn.close()


def test_two_processes_match_one_and_store_no_duplicates(inputs, tmp_path):
    one_log, one_s = run_pipeline(tmp_path / "one", inputs, processes=1)
    two_log, two_s = run_pipeline(tmp_path / "two", inputs, processes=2)
    print(f"one process {one_s:.1f} s, two processes {two_s:.1f} s")
    assert "process 1 of 2" in two_log, "the launch did not start a second process"
    assert "distributed:" not in one_log, "a plain `python main.py` must not start a process group"

    one = json.loads((tmp_path / "one/results/results.json").read_text())
    two = json.loads((tmp_path / "two/results/results.json").read_text())
    # baseline: exactly the same numbers (EX, by hardness, error classes; MMLU overall and per subject)
    for key in ("ex", "count", "by_hardness", "errors"):
        assert two["baseline"]["ex"][key] == one["baseline"]["ex"][key], key
    for key in ("accuracy", "correct", "count", "macro_accuracy", "by_subject"):
        assert two["baseline"]["mmlu"][key] == one["baseline"]["mmlu"][key], key

    a, b = store_rows(tmp_path / "one/results/results.sqlite"), store_rows(tmp_path / "two/results/results.sqlite")
    (run_name,) = two["runs"]  # the same name in both runs: a hash of the model, config and train data
    assert b["kinds"] == a["kinds"] == ["baseline_ex@spider_dev", "baseline_mmlu", f"ex_{run_name}@spider_dev",
                                        "mmlu_best"]
    for store in (a, b):
        assert store["duplicate_runs"] == store["duplicate_sql"] == store["duplicate_mmlu"] == 0
        assert store["duplicate_candidates"] == 0
    # baseline: exactly the same answer for every example and question
    assert b["sql"]["baseline_ex@spider_dev"] == a["sql"]["baseline_ex@spider_dev"]
    assert len(a["sql"]["baseline_ex@spider_dev"]) == one["baseline"]["ex"]["count"] == 24
    assert b["mmlu"]["baseline_mmlu"] == a["mmlu"]["baseline_mmlu"]
    # voting: the same candidates, fingerprints and votes
    base = "baseline_ex@spider_dev"
    assert b["candidates"][base] == a["candidates"][base] and len(a["candidates"][base]) == 24 * CANDIDATES
    assert b["votes"][base] == a["votes"][base] and len(a["votes"][base]) == 24
    voted_one, voted_two = one["baseline"]["ex"]["voted"], two["baseline"]["ex"]["voted"]
    assert {**voted_two, "seconds": None} == {**voted_one, "seconds": None}
    assert len(a["mmlu"]["baseline_mmlu"]) == one["baseline"]["mmlu"]["count"] == 18

    # after training (DDP with 2 processes): complete, not equal
    run_one, run_two = one["runs"][run_name], two["runs"][run_name]
    assert run_one["training"]["steps"] == run_two["training"]["steps"] == MAX_STEPS
    epoch = {name: json.loads((tmp_path / name / run["adapter_dir"]).parent.joinpath("training_log.json").read_text())
             ["log_history"][-1]["epoch"] for name, run in (("one", run_one), ("two", run_two))}
    assert epoch["two"] == pytest.approx(2 * epoch["one"]), f"not data parallel: epochs after {MAX_STEPS} steps {epoch}"
    assert run_two["ex"]["count"] == 24 and len(b["sql"][f"ex_{run_name}@spider_dev"]) == 24
    assert (len(b["candidates"][f"ex_{run_name}@spider_dev"]) == 24 * CANDIDATES
            and len(b["votes"][f"ex_{run_name}@spider_dev"]) == 24)
    assert two["best_mmlu"]["count"] == 18 and len(b["mmlu"]["mmlu_best"]) == 18
    assert two["regression"] is not None
    assert (tmp_path / "two/results/report.md").is_file()
    # the second process spooled its answers batch by batch (safe from an interruption); all were handed over
    spool = tmp_path / "two/results/results.sqlite.spool"
    assert spool.is_dir() and not list(spool.iterdir())
    assert not (tmp_path / "one/results/results.sqlite.spool").exists()  # one process: the store alone


def test_one_process_helpers_are_no_ops(monkeypatch):
    """Without a launcher: rank 0 of 1, every index kept, gather/broadcast hand the object back, no process group."""
    import torch.distributed as dist

    from scripts import distributed

    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    obj = {"a": [1, 2]}
    assert not distributed.launched()
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (1, 0, 0)
    assert distributed.is_main()
    assert distributed.shard(5) == [0, 1, 2, 3, 4]
    assert distributed.gather(obj) == [obj] and distributed.broadcast(obj) is obj
    distributed.barrier()
    with distributed.main_process_first():
        pass
    distributed.finish()
    assert not dist.is_initialized()
