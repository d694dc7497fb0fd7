"""Benchmark of QLoRA training throughput: TRAINING_CONFIGS levers against the naive reference, in one process.

Usage: python -m bench.bench_training MODEL FT_DATASET.jsonl [--steps N] [--only PARTS] [--attn-implementation eager]
    [--out DIR]
The reference is TRL SFTTrainer's usual QLoRA recipe (batch 16, gradient checkpointing, no packing, the model's
default attention with the batch's padding mask); each lever changes one to three things. Every variant trains
on the same STEPS x 16 examples (a batch of 8 takes twice the steps), so the losses compare after the same
answer tokens (packing excepted: a packed sequence holds several examples). Printed per variant: prompt+answer tokens/s, the ratio to the reference,
model FLOPs utilisation (6 x parameters x tokens / time / peak bf16 FLOP/s), peak memory, and the loss. A variant
that runs out of GPU memory, whose gradients turn non-finite or that fails otherwise (e.g. an attention that does not
load) is reported as such and the others go on; the table is saved after each.

The padding-free variants ("padding_free": each batch's examples in one row with their own position ids, no padding)
pair with the padding-mask ones, today's pipeline: "padding-free" against "padding mask dropped", "padding-free, bf16
weights" against "padding mask dropped, bf16 weights", and so on; being the same computation, a pair's losses agree
up to bf16 rounding. Under sdpa and eager the row gets one block-diagonal mask over all its tokens (attention as long
as the whole row); flex attention skips the masked blocks. Measure them with
    python -m bench.bench_training MODEL FT_DATASET.jsonl --steps 30 --only "padding-free,padding mask dropped"
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import traceback
from pathlib import Path

from bench import save_json
from scripts.errors import UserError
from scripts.pre_proc import load_jsonl
from scripts.training import QLoRATrainer
from scripts.training_config import validate_training_configs

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM
REFERENCE = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
             "packing": False, "drop_padding_mask": False}
LEVERS = {
    "reference (batch 16, checkpointing)": {},
    "no checkpointing": {"gradient_checkpointing": False},
    "no checkpointing, batch 32": {"gradient_checkpointing": False, "per_device_train_batch_size": 32},
    "no checkpointing, packing": {"gradient_checkpointing": False, "packing": True},
    "no checkpointing, batch 8": {"gradient_checkpointing": False, "per_device_train_batch_size": 8},
    "no checkpointing, batch 8, eager attention": {"gradient_checkpointing": False, "per_device_train_batch_size": 8,
                                                   "attn_implementation": "eager"},
    # one example per forward: no padding, so sdpa runs unmasked (causal) attention
    "no checkpointing, batch 1 x 16 accumulation": {"gradient_checkpointing": False, "per_device_train_batch_size": 1,
                                                    "gradient_accumulation_steps": 16},
    # the pipeline's default: right-padded batches without their padding mask, so sdpa takes its flash kernel
    "padding mask dropped": {"drop_padding_mask": True},
    "padding mask dropped, batch 32": {"drop_padding_mask": True, "per_device_train_batch_size": 32},
    "padding mask dropped, no checkpointing": {"drop_padding_mask": True, "gradient_checkpointing": False},
    "padding mask dropped, no checkpointing, batch 8": {"drop_padding_mask": True, "gradient_checkpointing": False,
                                                         "per_device_train_batch_size": 8},
    "padding mask dropped, no checkpointing, batch 32": {"drop_padding_mask": True, "gradient_checkpointing": False,
                                                          "per_device_train_batch_size": 32},
    # LoRA on bf16 weights (--quantization none in the pipeline): no 4-bit dequantization in every forward
    "padding mask dropped, no checkpointing, bf16 weights": {"drop_padding_mask": True, "gradient_checkpointing": False,
                                                              "quantization": "none"},
    "padding mask dropped, bf16 weights": {"drop_padding_mask": True, "quantization": "none"},
    "padding mask dropped, no checkpointing, bf16 weights, batch 32": {
        "drop_padding_mask": True, "gradient_checkpointing": False, "quantization": "none",
        "per_device_train_batch_size": 32},
    # every batch's examples end to end in one row (position ids restart per example): no compute on padding
    "padding-free": {"padding_free": True},
    "padding-free, flex attention": {"padding_free": True, "attn_implementation": "flex_attention"},
    "padding-free, bf16 weights": {"padding_free": True, "quantization": "none"},
    "padding-free, no checkpointing, bf16 weights": {"padding_free": True, "gradient_checkpointing": False,
                                                     "quantization": "none"},
    "padding-free, no checkpointing, bf16 weights, flex attention": {
        "padding_free": True, "gradient_checkpointing": False, "quantization": "none",
        "attn_implementation": "flex_attention"},
}
QUANTIZATION = "4bit"  # the reference's; a lever may set "quantization" to another value
REFERENCE_EXAMPLES_PER_STEP = 16


def count_parameters(model_id: str) -> int:
    """Parameters of the base model (from its config, without loading weights)."""
    from scripts.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_id, quantization="none")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    """Train every selected lever on the same examples and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("dataset", type=Path)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--max-length", type=int, default=1536)
    p.add_argument("--only", default="", help="comma-separated parts of lever names to run besides the reference")
    p.add_argument("--attn-implementation", default="auto", help="for every variant that does not set its own")
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = p.parse_args()
    data = load_jsonl(args.dataset)
    n_params = count_parameters(args.model)
    rows = []
    for name, lever in selected_levers(args.only).items():
        config = {**REFERENCE, "max_length": args.max_length, "save_steps": 10_000, "logging_steps": 5,
                  "attn_implementation": args.attn_implementation, **lever}
        config["max_steps"] = steps_for_same_examples(args.steps, config)
        quantization = config.pop("quantization", QUANTIZATION)
        [resolved] = validate_training_configs([config])
        rows.append({"variant": name, **train_once(args.model, resolved, data, n_params, quantization)})
        save_json(args.out, "bench_training.json", rows)
    reference = rows[0]["tokens_per_second"]
    print(f"{'variant':64} {'tokens/s':>10} {'ratio':>6} {'MFU':>6} {'peak GB':>8} {'loss end':>8}")
    for r in rows:
        if r.get("failed"):
            print(f"{r['variant']:64} {r['failed']}")
            continue
        r["ratio"] = r["tokens_per_second"] / reference if reference else None
        print(f"{r['variant']:64} {r['tokens_per_second']:10.0f} {r['ratio'] or 0:6.2f} {r['mfu']:6.1%} "
              f"{r['peak_memory_gb']:8.2f} {r['loss_end']:8.3f}")
    save_json(args.out, "bench_training.json", rows)


def selected_levers(only: str) -> dict:
    """The reference plus the levers whose names contain one of the comma-separated parts (all when empty)."""
    parts = [p for p in only.split(",") if p]
    return {name: lever for i, (name, lever) in enumerate(LEVERS.items())
            if i == 0 or not parts or any(part in name for part in parts)}


def steps_for_same_examples(reference_steps: int, config: dict) -> int:
    """Optimizer steps that make a config see as many examples as the reference in reference_steps."""
    per_step = config["per_device_train_batch_size"] * config["gradient_accumulation_steps"]
    return max(1, reference_steps * REFERENCE_EXAMPLES_PER_STEP // per_step)


def train_once(model_id: str, config: dict, data, n_params: int, quantization: str = QUANTIZATION) -> dict:
    """One short run in a scratch folder: its throughput, memory and loss, or {"failed": why}."""
    import torch

    folder = Path(tempfile.mkdtemp(prefix="bench_training_"))
    try:
        s = QLoRATrainer(model_id, folder, quantization=quantization).train(config, data)["summary"]
    except torch.OutOfMemoryError:
        return {"failed": "out of GPU memory", "tokens_per_second": None}
    except UserError as e:  # the pipeline's stop on non-finite gradients, or a refused setting
        return {"failed": str(e)[:120], "tokens_per_second": None}
    except Exception as e:  # noqa: BLE001 - e.g. an attention kernel that does not build here: the next variant runs
        traceback.print_exc()
        return {"failed": f"{type(e).__name__}: {str(e)[:100]}", "tokens_per_second": None}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"tokens_per_second": s["tokens_per_second"], "peak_memory_gb": s["peak_memory_gb"], "loss_end": s["loss_end"],
            "tokens_trained": s["tokens_trained"], "seconds": s["train_seconds"],
            "mfu": 6 * n_params * s["tokens_per_second"] / H100_BF16_FLOPS}


if __name__ == "__main__":
    main()
