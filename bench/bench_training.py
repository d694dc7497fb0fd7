"""Benchmark of QLoRA training throughput: TRAINING_CONFIGS levers against the naive reference, in one process.

Usage: python -m bench.bench_training MODEL FT_DATASET.jsonl [--steps N] [--attn-implementation eager] [--out DIR]
The reference is TRL SFTTrainer's usual QLoRA recipe (batch 16, gradient checkpointing, no packing); each lever
changes one thing. Printed per variant: answer+prompt tokens/s, the ratio to the reference, model FLOPs
utilisation (6 x trainable-path parameters x tokens / time / peak bf16 FLOP/s), peak memory, and the loss.
A variant that runs out of GPU memory is reported as such and the others go on; the table is saved after each.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bench import save_json
from scripts.pre_proc import load_jsonl
from scripts.training import QLoRATrainer, validate_training_configs

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM
REFERENCE = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
             "packing": False}
LEVERS = {
    "reference (batch 16, checkpointing)": {},
    "no checkpointing": {"gradient_checkpointing": False},
    "no checkpointing, batch 32": {"gradient_checkpointing": False, "per_device_train_batch_size": 32},
    "no checkpointing, packing": {"gradient_checkpointing": False, "packing": True},
}


def count_parameters(model_id: str) -> int:
    """Parameters of the base model (from its config, without loading weights)."""
    from scripts.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_id, quantization="none")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    """Train every lever for the same number of steps and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("dataset", type=Path)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--max-length", type=int, default=1536)
    p.add_argument("--attn-implementation", default="auto", help="for every variant (TRAINING_CONFIGS key)")
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = p.parse_args()
    data = load_jsonl(args.dataset)
    n_params = count_parameters(args.model)
    rows = []
    for name, lever in LEVERS.items():
        config = {**REFERENCE, "max_steps": args.steps, "max_length": args.max_length, "save_steps": 10_000,
                  "logging_steps": 5, "attn_implementation": args.attn_implementation, **lever}
        [resolved] = validate_training_configs([config])
        rows.append({"variant": name, **train_once(args.model, resolved, data, n_params)})
        save_json(args.out, "bench_training.json", rows)
    reference = rows[0]["tokens_per_second"]
    print(f"{'variant':40} {'tokens/s':>10} {'ratio':>6} {'MFU':>6} {'peak GB':>8} {'loss end':>8}")
    for r in rows:
        if r.get("out_of_memory"):
            print(f"{r['variant']:40} {'out of GPU memory':>10}")
            continue
        r["ratio"] = r["tokens_per_second"] / reference if reference else None
        print(f"{r['variant']:40} {r['tokens_per_second']:10.0f} {r['ratio'] or 0:6.2f} {r['mfu']:6.1%} "
              f"{r['peak_memory_gb']:8.2f} {r['loss_end']:8.3f}")
    save_json(args.out, "bench_training.json", rows)


def train_once(model_id: str, config: dict, data, n_params: int) -> dict:
    """One short run in a scratch folder: its throughput, memory and loss, or {"out_of_memory": True}."""
    import torch

    folder = Path(tempfile.mkdtemp(prefix="bench_training_"))
    try:
        s = QLoRATrainer(model_id, folder, quantization="4bit").train(config, data)["summary"]
    except torch.OutOfMemoryError:
        return {"out_of_memory": True, "tokens_per_second": None}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"tokens_per_second": s["tokens_per_second"], "peak_memory_gb": s["peak_memory_gb"], "loss_end": s["loss_end"],
            "tokens_trained": s["tokens_trained"], "seconds": s["train_seconds"],
            "mfu": 6 * n_params * s["tokens_per_second"] / H100_BF16_FLOPS}


if __name__ == "__main__":
    main()
