"""Benchmark of loading a .gguf model: the first load (dequantize, save the cached folder) against later loads.

Usage: python -m bench.bench_model_load MODEL.gguf [--quantization none|4bit|auto] [--repeats 2]
Uses a fresh cache folder, so the first load converts; each later load reads the cached safetensors folder.
Printed: seconds of each load and the ratio of the first to the mean of the later ones.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench import timed
from scripts.models import load_model_and_tokenizer


def timed_load(model: str, quantization: str, cache_dir: Path) -> float:
    """Seconds to load model and tokenizer through the pipeline's loader."""
    return timed(lambda: load_model_and_tokenizer(model, quantization=quantization, cache_dir=cache_dir))[1]


def main() -> None:
    """First load, then cached loads, with a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a .gguf file")
    p.add_argument("--quantization", default="none")
    p.add_argument("--repeats", type=int, default=2, help="cached loads after the first")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first = timed_load(args.model, args.quantization, Path(cache))
        later = [timed_load(args.model, args.quantization, Path(cache)) for _ in range(args.repeats)]
    mean = sum(later) / len(later)
    print(f"first load (conversion included): {first:7.1f} s")
    print(f"cached loads: {', '.join(f'{s:.1f}' for s in later)} s (mean {mean:.1f} s)")
    print(f"ratio first / cached: {first / mean:.1f}x")


if __name__ == "__main__":
    main()
