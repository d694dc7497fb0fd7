"""Diagnosis of NaN gradients in training: the first non-finite step under several attention and precision settings.

Usage: python -m bench.diagnose_nan MODEL FT_DATASET.jsonl OUT_DIR VARIANTS [STOP_AT]
VARIANTS is a comma-separated list of: 4bit (the pipeline's QLoRA), 4bit_eager (eager attention), none (bf16 LoRA
without quantization), 4bit_fp32 (4-bit with float32 compute and no bf16 autocast). Each trains the first training
config of docs/RESULTS.md section 9 (lr 2e-4, batch 8 or $BATCH, the full schedule) until its first NaN gradient norm
or step STOP_AT (default 45), logging every step. Written to OUT_DIR/../diag.json: per variant the (step, loss,
grad norm) rows, the first NaN step, and the lengths and last 300 characters of the examples of that step's batch.
Run once on the H100 as diag_nan.py (section 9); committed with this docstring added.
"""
import json
import math
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

import scripts.models as models
import scripts.training as training
from scripts.pre_proc import load_jsonl
from scripts.training_config import validate_training_configs

MODEL, DATA, OUT = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
VARIANTS = sys.argv[4].split(",")
STOP_AT = int(sys.argv[5]) if len(sys.argv) > 5 else 45


class Watch(TrainerCallback):
    def __init__(self, tok):
        self.tok, self.rows, self.first_nan, self.last_ids = tok, [], None, None

    def on_log(self, args, state, control, logs=None, **kw):
        g, l = (logs or {}).get("grad_norm"), (logs or {}).get("loss")
        if g is None:
            return
        self.rows.append((state.global_step, l, g))
        if not math.isfinite(g) and self.first_nan is None:
            self.first_nan = state.global_step
            try:
                ids = self.last_ids
                self.lengths = [int((r != self.tok.pad_token_id).sum()) for r in ids]
                self.batch = [self.tok.decode(r[r != self.tok.pad_token_id][-300:]) for r in ids]
            except Exception as e:  # noqa
                self.batch = repr(e)
            control.should_training_stop = True
        if state.global_step >= STOP_AT:
            control.should_training_stop = True


orig_kwargs, orig_sft = models._model_kwargs, training._sft_config
report = {}
for variant in VARIANTS:
    quant = "none" if variant.startswith("none") else "4bit"
    eager = "eager" in variant
    fp32 = "fp32" in variant

    def kwargs(q, cuda, eager=eager, fp32=fp32):
        k = orig_kwargs(q, cuda)
        if eager:
            k["attn_implementation"] = "eager"
        if fp32:
            k["dtype"] = torch.float32
            if "quantization_config" in k:
                k["quantization_config"].bnb_4bit_compute_dtype = torch.float32
        return k

    def sft(config, out, fp32=fp32):
        c = orig_sft(config, out)
        if fp32:
            c.bf16 = False
        return c

    models._model_kwargs, training._sft_config = kwargs, sft
    holder = {}

    def loader(model_id, **kw):
        m, t = models.load_model_and_tokenizer(model_id, **kw)
        holder["tok"] = t
        watch.tok = t

        def hook(mod, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None:
                watch.last_ids = ids.detach().cpu()
        m.register_forward_pre_hook(hook, with_kwargs=True)
        return m, t

    watch = Watch(None)
    trainer = training.QLoRATrainer(MODEL, OUT / variant, quantization=quant, loader=loader, callbacks=[watch])
    config = validate_training_configs([{
        "learning_rate": 2e-4, "num_train_epochs": 1, "per_device_train_batch_size": int(os.environ.get("BATCH", 8)),
        "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "max_length": 1536,
        "save_steps": 100000, "logging_steps": 1}])[0]
    try:
        trainer.train(config, load_jsonl(DATA), "diag")
    except Exception as e:  # noqa
        report[variant] = {"error": repr(e)[:500]}
    r = report.setdefault(variant, {})
    r.update(first_nan=watch.first_nan, rows=watch.rows[:60], batch=getattr(watch, "batch", None),
             lengths=getattr(watch, "lengths", None), peak_gb=torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None)
    print(variant, "first NaN at", watch.first_nan, "steps", len(watch.rows), flush=True)
    print([(s, round(l, 3) if l is not None else None, round(g, 3) if g is not None and math.isfinite(g) else g)
           for s, l, g in watch.rows[20:50]], flush=True)
    torch.cuda.is_available() and torch.cuda.empty_cache()
    torch.cuda.is_available() and torch.cuda.reset_peak_memory_stats()
    (OUT.parent / "diag.json").write_text(json.dumps(report, indent=1, default=str))
