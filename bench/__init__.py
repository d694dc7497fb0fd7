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
