"""A pipeline run (main.py, in this process) on a GPU capped to GIB gigabytes: per-stage seconds and peak memory.

Usage: python -m bench.capped_run --gpu-gb GIB [--out FILE.json] -- <main.py arguments>

    python -m bench.seed_models mistral_7b --out /tmp/seed/mistral_7b --corpus "$TEXT2SQL_DATA/spider_data"
    python -m bench.capped_run --gpu-gb 16 --out /tmp/t4_mistral.json -- --model /tmp/seed/mistral_7b \\
        --spider-zip "$TEXT2SQL_DATA/spider_data.zip" --mmlu "$TEXT2SQL_DATA/mmlu" --sample-size-train 200 \\
        --sample-size-eval 50
(TEXT2SQL_DATA: a folder holding spider_data/, spider_data.zip and mmlu/.)

`torch.cuda.set_per_process_memory_fraction(GIB / total)` caps what PyTorch's allocator may hand out on GPU 0 (an
H200 stands in for a 16, 24 or 40 GB GPU; the CUDA context itself, ~0.5 GB, is outside the cap), then main.main
runs with the arguments after `--`. Each stage function that main.run calls is timed, with its peak allocated and
reserved memory (the peak statistics are reset at each stage's start; a stage inside another counts for both).
Written to --out (and printed): the cap, the GPU, main's exit status and any error it logged, every stage's
seconds and peaks, the out-of-memory warnings, and per training run the batch it settled on
(per_device_train_batch_size, gradient_accumulation_steps, oom_retries) with its training summary. Without CUDA
the run is not capped and the memory fields are null (a CPU smoke test).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

GIB = 1024 ** 3
# (module, function, how the stage is named from its arguments): what main.run calls, in order
STAGE_FUNCTIONS: list[tuple[str, str, Callable[..., str]]] = [
    ("scripts.spider_data", "prepare_stage", lambda *a, **k: "data"),
    ("scripts.evaluate", "sets_stage", lambda stage, prefix, *a, **k: prefix),  # every evaluation set
    ("scripts.evaluate", "ex_stage", lambda stage, name, *a, **k: name),  # one set: <stage>@<set name>
    ("scripts.mmlu", "mmlu_stage", lambda stage, *a, **k: stage),
    ("scripts.pre_proc", "preprocess_stage", lambda *a, **k: "preprocess"),
    ("scripts.training", "train_stage", lambda *a, **k: "train"),
    ("scripts.evaluate", "adapters_stage", lambda *a, **k: "eval_adapters"),
    ("scripts.regression", "regression_stage", lambda *a, **k: "regression"),
    ("scripts.report", "report_stage", lambda *a, **k: "report"),
]


def apply_cap(gib: float) -> dict:
    """Cap GPU 0 at gib GiB for this process; what was set (all null without CUDA)."""
    if not torch.cuda.is_available():
        return {"gpu": None, "total_gib": None, "cap_gib": None, "fraction": None}
    props = torch.cuda.get_device_properties(0)
    fraction = min(1.0, gib * GIB / props.total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "total_gib": round(props.total_memory / GIB, 2), "cap_gib": gib, "fraction": round(fraction, 4)}


class StageRecorder:
    """Wraps main.run's stage functions: seconds and peak memory of each call, in call order."""

    def __init__(self) -> None:
        self.stages: list[dict] = []
        self._open: list[dict] = []
        self.results: dict | None = None

    def wrap(self, name_of: Callable[..., str], function: Callable) -> Callable:
        """function, timed and measured under the name name_of(*its arguments)."""
        def timed(*args, **kwargs):
            with self.stage(name_of(*args, **kwargs)):
                result = function(*args, **kwargs)
            if function.__name__ == "report_stage":
                self.results = result
            return result

        return timed

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time and measure one stage (nested stages also count for the stage around them)."""
        cuda = torch.cuda.is_available()
        record: dict[str, Any] = {"stage": name, "seconds": None, "peak_allocated_gib": None, "peak_reserved_gib": None}
        if cuda:
            self._fold_peaks()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._open.append(record)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            record["seconds"] = round(time.perf_counter() - start, 2)
            self._fold_peaks()
            self._open.pop()
            if self._open and cuda:
                parent = self._open[-1]
                for key in ("peak_allocated_gib", "peak_reserved_gib"):
                    parent[key] = max(parent[key] or 0.0, record[key] or 0.0)
            self.stages.append(record)

    def _fold_peaks(self) -> None:
        """Fold the current peak statistics into every open stage."""
        if not torch.cuda.is_available():
            return
        allocated = round(torch.cuda.max_memory_allocated() / GIB, 3)
        reserved = round(torch.cuda.max_memory_reserved() / GIB, 3)
        for record in self._open:
            record["peak_allocated_gib"] = max(record["peak_allocated_gib"] or 0.0, allocated)
            record["peak_reserved_gib"] = max(record["peak_reserved_gib"] or 0.0, reserved)


class _Collect(logging.Handler):
    """Keeps the log records a run's outcome needs: errors, and warnings about out of memory."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.errors: list[str] = []
        self.out_of_memory: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            self.errors.append(message)
        elif "out of memory" in message:
            self.out_of_memory.append(message)


def training_runs(results: dict | None) -> dict:
    """Per training run: the batch it settled on and its training summary (from report_stage's results)."""
    runs = {}
    for name, run in ((results or {}).get("runs") or {}).items():
        summary = run.get("training") or {}
        runs[name] = {"per_device_train_batch_size": summary.get("per_device_train_batch_size"),
                      "gradient_accumulation_steps": summary.get("gradient_accumulation_steps"),
                      "oom_retries": summary.get("oom_retries"), "summary": summary}
    return runs


def capped_run(gib: float, main_args: list[str]) -> dict:
    """Cap the GPU, run main.main(main_args) with its stages recorded; the record."""
    import importlib

    import main as pipeline

    cap = apply_cap(gib)
    recorder, collect = StageRecorder(), _Collect()
    originals = []
    for module_name, function_name, name_of in STAGE_FUNCTIONS:
        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
        originals.append((module, function_name, function))
        setattr(module, function_name, recorder.wrap(name_of, function))
    logging.getLogger().addHandler(collect)
    start = time.perf_counter()
    try:
        status = pipeline.main(main_args)
    finally:
        logging.getLogger().removeHandler(collect)
        for module, function_name, function in originals:
            setattr(module, function_name, function)
    cuda = torch.cuda.is_available()
    return {
        "cap": cap, "main_args": main_args, "exit_status": status, "errors": collect.errors,
        "seconds": round(time.perf_counter() - start, 2), "stages": recorder.stages,
        "max_allocated_gib": max((s["peak_allocated_gib"] or 0.0 for s in recorder.stages), default=None) if cuda else None,
        "max_reserved_gib": max((s["peak_reserved_gib"] or 0.0 for s in recorder.stages), default=None) if cuda else None,
        "out_of_memory_warnings": collect.out_of_memory, "training_runs": training_runs(recorder.results),
        "versions": {"torch": torch.__version__, **_versions("transformers", "peft", "trl", "accelerate", "bitsandbytes")},
    }


def _versions(*names: str) -> dict:
    """Installed versions of these packages (None when absent)."""
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    """Parse `--gpu-gb GIB [--out FILE] -- <main.py args>`, run, write and print the record; main's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, main_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="python -m bench.capped_run --gpu-gb GIB [--out FILE.json] -- <main.py args>")
    parser.add_argument("--gpu-gb", type=float, required=True, help="GiB of GPU memory this process may allocate")
    parser.add_argument("--out", type=Path, help="JSON file to write the record to")
    args = parser.parse_args(ours)
    record = capped_run(args.gpu_gb, main_args)
    text = json.dumps(record, indent=1, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return record["exit_status"]


if __name__ == "__main__":
    raise SystemExit(main())
