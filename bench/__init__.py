"""Benchmarks that print ratios against a reference measured in the same run."""
from __future__ import annotations

import json
import time
from pathlib import Path


def save_json(out: Path | None, name: str, data) -> None:
    """Write data to out/name when an output folder was given (--out)."""
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(data, indent=1))


def timed(fn):
    """(fn(), seconds), the GPU synchronised on both ends."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def warm_up(model, tokenizer, prompts: list[str], seconds: float) -> int:
    """Generate from the first 16 prompts until `seconds` have passed (at least once), so that nothing is timed on
    a cold GPU (an idle H200's clock read 345 MHz; docs/RESULTS.md section 22); returns the passes run."""
    from scripts.generation import generate

    start, passes = time.perf_counter(), 0
    while passes == 0 or time.perf_counter() - start < seconds:
        generate(model, tokenizer, prompts[:16], batch_size=16, max_new_tokens=32)
        passes += 1
    return passes
