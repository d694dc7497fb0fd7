"""Stage 4: QLoRA supervised fine-tuning with TRL's SFTTrainer + PEFT LoRA, one run per TRAINING_CONFIGS entry.

Each run writes results/<run-name>/:
    adapter/            LoRA adapter + tokenizer (load with scripts.models.load_model_and_tokenizer(adapter=...))
    config.json         the exact configuration used (all keys resolved, base model, data fingerprint)
    training_log.json   loss per logged step, Trainer log history, summary (loss start->end, tokens/s, time, peak memory)
    checkpoints/        Trainer checkpoints; an interrupted run resumes from the last one
    batch.json          only after a CUDA out-of-memory retry: the per-device batch and accumulation it settled on
The run name is `<model>-<hash of model, resolved config and train data>`, so a rerun skips a completed run
(unless force=True) and resumes an interrupted one.

Loss is computed on the answer tokens only: rows are tokenized here exactly as at inference (prompt tokenized
without added special tokens), prompt tokens get label -100, and the completion already ends with the template's
end of turn (or eos), so nothing is appended (no double eos).

Memory: each attempt loads its own model and frees it (and its trainer) when it ends. On out of memory in the training
steps the run is retried with half the per-device batch and twice the accumulation (the same effective batch), from
its last checkpoint; at batch 1, or under several processes, it stops with a UserError that says what to change.
Weights that run out of memory as they load stop the run at once (scripts.models.DoesNotFit): no batch is halved.
Mixed precision follows scripts.models.precision(): bf16 on GPUs with native bf16, else fp16 with the LoRA weights
in float32.

Batches are right-padded, or with "padding_free" (and with "packing", which TRL collates the same way) one row of the
batch's examples end to end, each with position ids from 0 and no padding mask: transformers' masking_utils reads the
restarts as example boundaries and gives sdpa, eager and flex attention a block-diagonal mask (flash attention runs
its varlen kernel), so every example's loss and gradients are those it has alone. A model or attention that would let
the examples see each other is refused (check_padding_free). tokens/s and tokens_trained count real tokens only
(prompt and answer, no padding) either way.

Under `accelerate launch` every process loads its own copy of the model (on its GPU) and the Trainer runs
data-parallel (DDP); the main process alone writes config.json, the adapter and training_log.json, and the
others wait for them before a later stage reads them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import resource
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from scripts import distributed
from scripts.errors import UserError
from scripts.run_state import write_json
from scripts.training_config import TRAINING_DEFAULTS, validate_training_configs

log = logging.getLogger(__name__)

_ADDED_LATER = ("attn_implementation", "drop_padding_mask", "padding_free")


def run_name(base_model_id: str, config: dict, data_fingerprint: str | None) -> str:
    """`<model>-<10 hex>`: stable for the same base model, resolved config and train data."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(base_model_id).rstrip("/")).name).strip("-.").lower()[:40] or "model"
    # a key added later stays out of the name while it has its default, so earlier runs keep their names
    named = {k: v for k, v in config.items() if not (k in _ADDED_LATER and v == TRAINING_DEFAULTS[k])}
    text = json.dumps([str(base_model_id), named, data_fingerprint], sort_keys=True)
    return f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def tokenize_for_training(dataset, tokenizer, max_length: int):
    """(Dataset of input_ids/labels, counts): prompt tokens as at inference with label -100, answer tokens trained."""
    from datasets import Dataset

    rows, counts = {"input_ids": [], "labels": []}, {"dropped_too_long": 0, "boundary_retokenized": 0}
    for prompt, completion in zip(dataset["prompt"], dataset["completion"]):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:  # tokens merged across the boundary: keep the inference prompt
            ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
            counts["boundary_retokenized"] += 1
        if len(ids) > max_length:
            counts["dropped_too_long"] += 1
            continue
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * len(prompt_ids) + ids[len(prompt_ids):])
    return Dataset.from_dict(rows), counts


def peak_memory() -> tuple[float, str]:
    """(GB, kind): CUDA peak allocated memory, else this process's peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9, "cuda_max_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9, "cpu_max_rss"


def _default_loader(model_id: str, **kwargs):
    """scripts.models.load_model_and_tokenizer (imported late: another module owns it)."""
    from scripts.models import load_model_and_tokenizer

    return load_model_and_tokenizer(model_id, **kwargs)


class QLoRATrainer:
    """Runs LoRA/QLoRA SFT for each config into results/<run-name>/, skipping completed runs, resuming interrupted ones."""

    def __init__(
        self,
        base_model_id: str,
        results_dir: Path,
        *,
        quantization: str = "auto",
        token: str | None = None,
        force: bool = False,
        loader: Callable | None = None,
        callbacks: Sequence = (),
    ) -> None:
        self.base_model_id = base_model_id
        self.results_dir = Path(results_dir)
        self.quantization = quantization
        self._token = token
        self.force = force
        self.loader = loader or _default_loader
        self.callbacks = list(callbacks)

    def run_dir(self, config: dict, data_fingerprint: str | None) -> Path:
        """results/<run-name> for this config."""
        return self.results_dir / run_name(self.base_model_id, config, data_fingerprint)

    @staticmethod
    def completed(run_dir: Path) -> dict | None:
        """The saved result of a finished run (adapter and log present), else None."""
        log_file = run_dir / "training_log.json"
        if not log_file.exists() or not (run_dir / "adapter" / "adapter_config.json").exists():
            return None
        saved = json.loads(log_file.read_text())
        return _result(run_dir, saved) if saved.get("completed") else None

    def completed_runs(self, configs: list[dict], data_fingerprint: str | None) -> dict:
        """{run name: result} of the configs already trained (nothing is trained)."""
        found = {}
        for config in configs:
            result = self.completed(self.run_dir(config, data_fingerprint))
            if result:
                found[result["run_name"]] = result
        return found

    def train_all(self, configs: list[dict], dataset, data_fingerprint: str | None) -> dict:
        """{run name: result} for every config, in order."""
        results = {}
        for i, config in enumerate(configs, 1):
            log.info("training run %d/%d", i, len(configs))
            result = self.train(config, dataset, data_fingerprint)
            results[result["run_name"]] = result
        return results

    def train(self, config: dict, dataset, data_fingerprint: str | None = None) -> dict:
        """One run (config already resolved by validate_training_configs): skip, resume or train from scratch.

        A CUDA out-of-memory error in training is retried with half the per-device batch and twice the accumulation
        (the same effective batch), from the last checkpoint if any; the batch it settles on is kept in the run
        folder (batch.json), so a rerun starts from it. Model and trainer are released after every attempt.
        """
        run_dir = self.run_dir(config, data_fingerprint)
        done = distributed.broadcast(self.completed(run_dir) if distributed.is_main() else None)
        if done and not self.force:
            log.info("run %s: already trained, skipping (force=True retrains)", run_dir.name)
            return done
        if distributed.is_main():
            if self.force and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "config.json", {"base_model_id": self.base_model_id,
                                                 "quantization": self.quantization,
                                                 "data_fingerprint": data_fingerprint, "training": config})
        distributed.barrier()  # the run folder is ready (and a forced rerun's old one gone) before anyone reads it
        _import_trainer()
        batch = distributed.broadcast(settled_batch(run_dir, config))
        while True:
            result, out_of_memory = self._attempt(run_dir, config, batch, dataset)
            if result is not None:
                return result
            batch = self._smaller_batch(run_dir, config, batch, out_of_memory)

    def _attempt(self, run_dir: Path, config: dict, batch: dict, dataset) -> tuple[dict | None, str | None]:
        """(result, None) for a finished run, or (None, what ran out) after out of memory in the steps; memory freed."""
        from scripts import gpu_memory

        try:
            return self._load_and_fit(run_dir, config, batch, dataset), None
        except StepsOutOfMemory as error:
            requested = gpu_memory.requested_text(error.__cause__)
            return None, gpu_memory.gpu_memory_text() + (f"; the failed allocation asked for {requested} more"
                                                         if requested else "")
        finally:  # the model, the trainer and (after an error) the traceback's activations are gone from here on
            gpu_memory.release_memory()

    def _smaller_batch(self, run_dir: Path, config: dict, batch: dict, out_of_memory: str) -> dict:
        """The next batch after an out-of-memory error (saved to batch.json), or a UserError when none can be tried."""
        size, steps = batch["per_device_train_batch_size"], batch["gradient_accumulation_steps"]
        where = f"run {run_dir.name}: out of memory in training at per-device batch {size} x {steps} accumulated " \
                f"({out_of_memory})"
        smaller = halved_batch(size)
        if smaller is None:
            raise UserError(f"{where}. It does not fit even one example per step: {self._what_to_change(config)}")
        new = {"per_device_train_batch_size": smaller, "gradient_accumulation_steps": steps * size // smaller,
               "oom_retries": batch["oom_retries"] + 1}
        if distributed.world_size() > 1:
            raise UserError(
                f"{where}. Under accelerate launch the batch is not retried (every process would have to change it "
                f"together): set \"per_device_train_batch_size\": {smaller} and \"gradient_accumulation_steps\": "
                f"{new['gradient_accumulation_steps']} in this TRAINING_CONFIGS entry (the same effective batch)")
        log.warning("%s; retrying with %d x %d (the same effective batch of %d examples)%s", where, smaller,
                    new["gradient_accumulation_steps"], size * steps,
                    ", from the last checkpoint" if list((run_dir / "checkpoints").glob("checkpoint-*")) else "")
        write_json(run_dir / BATCH_FILE, {**new, "reason": where})
        return new

    def _what_to_change(self, config: dict) -> str:
        """The settings that lower a training step's memory, as they stand for this run."""
        from scripts.models import choose_quantization

        fixes = [f'a lower "max_length" (now {config["max_length"]}) in this TRAINING_CONFIGS entry']
        if not config["gradient_checkpointing"]:
            fixes.append('"gradient_checkpointing": true')
        if choose_quantization(self.quantization)[0] != "4bit":
            fixes.append("QUANTIZATION 4bit (main.py, .env or --quantization)")
        fixes.append("a smaller model (BASE_MODEL_ID) or a GPU with more memory")
        return "; ".join(fixes)

    def _load_and_fit(self, run_dir: Path, config: dict, batch: dict, dataset) -> dict:
        """Load the model for training, tokenize the data set and fit (one attempt at one batch size)."""
        from scripts.models import choose_quantization, load_fits

        attention = {} if config["attn_implementation"] == "auto" else {"attn_implementation": config["attn_implementation"]}
        with load_fits(self.base_model_id, choose_quantization(self.quantization)[0]):
            model, tokenizer = self.loader(self.base_model_id, quantization=self.quantization, token=self._token,
                                           for_training=True, **attention)
        check_padding_free(model, config, run_dir.name)
        tokenizer.padding_side = "right"
        if config["drop_padding_mask"]:
            model.register_forward_pre_hook(_drop_padding_mask, with_kwargs=True)
        if tokenizer.pad_token is None:  # base models: pad positions get label -100, so eos is a safe pad
            tokenizer.pad_token = tokenizer.eos_token
        train_data, counts = tokenize_for_training(dataset, tokenizer, config["max_length"])
        if len(train_data) == 0:
            raise UserError(f"run {run_dir.name}: no example fits in max_length={config['max_length']}; raise it in TRAINING_CONFIGS")
        if counts["dropped_too_long"]:
            log.warning("run %s: %d examples over max_length=%d tokens dropped", run_dir.name,
                        counts["dropped_too_long"], config["max_length"])
        return self._fit(run_dir, config, batch, model, tokenizer, train_data, counts)

    def _fit(self, run_dir: Path, config: dict, batch: dict, model, tokenizer, train_data, counts: dict) -> dict:
        """SFTTrainer.train (resuming from the last checkpoint), then adapter, tokenizer and log to disk."""
        import torch
        from transformers.trainer_utils import get_last_checkpoint
        from trl import SFTTrainer

        from scripts.training_callbacks import SessionStats, StopOnNonFiniteGradients

        checkpoints = run_dir / "checkpoints"
        resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        if resume:
            log.info("run %s: resuming from %s", run_dir.name, resume)
        session = SessionStats.resumed_from(resume)
        with _steps_out_of_memory():
            trainer = SFTTrainer(
                model=model,
                args=_sft_config({**config, **{k: batch[k] for k in BATCH_KEYS}}, checkpoints),
                train_dataset=train_data,
                processing_class=tokenizer,
                peft_config=_lora_config(config),
                callbacks=[session, StopOnNonFiniteGradients(run_dir.name), *self.callbacks],
            )
            if trainer.args.fp16:  # the fp16 gradient scaler updates float32 weights only (TRL makes 4-bit's LoRA bf16)
                _trainable_to_float32(trainer.model)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            trainer.train(resume_from_checkpoint=resume)
        session_seconds = session.session_seconds()
        seconds = session.seconds_before + session_seconds
        adapter_dir = run_dir / "adapter"
        if distributed.is_main():
            trainer.model.save_pretrained(adapter_dir)
            tokenizer.save_pretrained(adapter_dir)
        history = trainer.state.log_history
        loss_curve = [[h["step"], h["loss"]] for h in history if "loss" in h]
        memory_gb, memory_kind = peak_memory()
        summary = {
            "steps": trainer.state.global_step,
            "examples": len(train_data),
            "loss_start": loss_curve[0][1] if loss_curve else None,
            "loss_end": loss_curve[-1][1] if loss_curve else None,
            "train_seconds": round(seconds, 2),  # a resumed run: its earlier sessions up to the checkpoint included
            "session_seconds": round(session_seconds, 2),
            "tokens_per_second": round(trainer.state.num_input_tokens_seen / seconds, 1) if seconds > 0 else None,
            "tokens_trained": trainer.state.num_input_tokens_seen,
            "tokens_counted": "non_padding",  # tokens_trained and tokens_per_second: prompt and answer, no padding
            "peak_memory_gb": round(memory_gb, 3),
            "peak_memory_kind": memory_kind,
            "resumed_from": Path(resume).name if resume else None,
            **batch,  # the batch trained with: the config's, or what out-of-memory retries settled on
            "mixed_precision": "fp16" if trainer.args.fp16 else "bf16" if trainer.args.bf16 else "no",
            **counts,
        }
        saved = {"completed": True, "summary": summary, "loss_curve": loss_curve, "log_history": history}
        if distributed.is_main():
            write_json(run_dir / "training_log.json", saved)
        distributed.barrier()  # adapter and log on disk before any process goes on to read them
        log.info(
            "run %s: loss %s -> %s, %s tokens/s (padding excluded), %.0f s, peak memory %.2f GB (%s), batch %d x %d%s",
            run_dir.name,
            _fmt(summary["loss_start"]), _fmt(summary["loss_end"]), summary["tokens_per_second"], seconds, memory_gb,
            memory_kind, batch["per_device_train_batch_size"], batch["gradient_accumulation_steps"],
            f", resumed from {summary['resumed_from']}" if resume else "",
        )
        return _result(run_dir, saved)


class StepsOutOfMemory(Exception):
    """Out of memory while the training steps ran (from the library's error): the one kind retried, smaller."""


@contextmanager
def _steps_out_of_memory() -> Iterator[None]:
    """Mark an out-of-memory error raised in here as the training steps' own (StepsOutOfMemory)."""
    from scripts import gpu_memory

    try:
        yield
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - only out-of-memory errors are marked, the rest pass through
        if not gpu_memory.is_out_of_memory(error):
            raise
        raise StepsOutOfMemory(str(error)) from error


def _import_trainer() -> None:
    """Import the Trainer's stack (trl, peft, bitsandbytes) before any model is loaded.

    A first import run while a model is a local variable can pin it: an exception a library keeps from its import
    (bitsandbytes logs one) holds the traceback, whose frames hold the model even after training returns.
    """
    import transformers.trainer_utils  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    import scripts.training_callbacks  # noqa: F401


BATCH_FILE = "batch.json"  # in a run folder: the batch that out-of-memory retries settled on; a rerun starts from it
BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps")


def halved_batch(size: int) -> int | None:
    """The per-device batch to retry with after out of memory: the largest divisor of size up to half of it (None at 1).

    A divisor keeps the effective batch (batch x accumulation) exactly the same: 8 -> 4, 6 -> 3, 5 -> 1.
    """
    return next((d for d in range(size // 2, 0, -1) if size % d == 0), None)


def settled_batch(run_dir: Path, config: dict) -> dict:
    """The batch to start with: the one in the run's batch.json (an earlier out-of-memory retry), else the config's."""
    batch = {**{k: config[k] for k in BATCH_KEYS}, "oom_retries": 0}
    path = run_dir / BATCH_FILE
    if not path.exists():
        return batch
    saved = json.loads(path.read_text())
    effective = saved["per_device_train_batch_size"] * saved["gradient_accumulation_steps"]
    if effective != batch["per_device_train_batch_size"] * batch["gradient_accumulation_steps"]:
        log.warning("run %s: %s is for another effective batch, ignored", run_dir.name, path)
        return batch
    log.info("run %s: starting from batch %d x %d, which an earlier out-of-memory retry settled on (%s)", run_dir.name,
             saved["per_device_train_batch_size"], saved["gradient_accumulation_steps"], path)
    return {**{k: saved[k] for k in BATCH_KEYS}, "oom_retries": saved.get("oom_retries", 0)}


def _trainable_to_float32(model) -> int:
    """Cast the trainable (LoRA) weights to float32, as fp16 mixed precision needs; how many were cast."""
    import torch

    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            cast += 1
    return cast


def _drop_padding_mask(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: a right-padded batch goes through the model without its padding mask (causal attention only).

    Exact for every token that counts: a row's pad tokens come after all its real tokens, so causal attention never
    lets a real token see them; only the pad positions' outputs change, and their labels are -100. Without a mask,
    sdpa takes its flash kernel (is_causal) instead of the memory-efficient one, whose masked backward can return
    NaN (docs/RESULTS.md, section 9). Left-padded or other masks are kept.
    """
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        kwargs["attention_mask"] = None
    return args, kwargs


# attention that keeps a padding-free row's examples apart given only their position ids: masking_utils' mask functions
# (sdpa, eager, flex) and flash attention's varlen kernels; anything else gets no packed-sequence mask
PADDING_FREE_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                          "flash_attention_4")
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}
_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")


def padding_free_collator(config: dict) -> bool:
    """Whether TRL collates this config's batches padding-free: "padding_free", or "packing" (its BFD packing does)."""
    return config["padding_free"] or config["packing"]


def check_padding_free(model, config: dict, run: str) -> None:
    """A UserError where a padding-free row would let its examples attend to each other (nothing to check otherwise)."""
    if not padding_free_collator(config):
        return
    setting = '"padding_free": true' if config["padding_free"] else '"packing": true'
    where = f"run {run}: {setting} puts a batch's examples in one row"
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in PADDING_FREE_ATTENTION:
        raise UserError(f"{where}, and {attention!r} attention would let them see each other: set "
                        f'"attn_implementation" to "sdpa", "eager" or "flex_attention", or leave {setting} out')
    modeling = sys.modules.get(type(model).__module__)
    if not any(hasattr(modeling, name) for name in _MASK_BUILDERS):
        raise UserError(f"{where}, and {type(model).__name__} does not build its attention mask with transformers' "
                        f"masking_utils, which separates the examples: leave {setting} out for this model")
    other = sorted(set(getattr(model.config, "layer_types", None) or ()) - _ATTENTION_LAYERS)
    if other:
        raise UserError(f"{where}, and its {', '.join(other)} layers pass state from one example into the next: "
                        f"leave {setting} out for this model")
    if attention in ("sdpa", "eager"):
        log.info("run %s: %s under %s attention: one block-diagonal mask over the whole row, so attention costs grow "
                 "with the batch's total length (flex_attention or flash attention skip the masked blocks)", run,
                 setting, attention)


def _sft_config(config: dict, output_dir: Path):
    """TRL SFTConfig from a resolved TRAINING_CONFIGS entry; mixed precision as scripts.models.precision() says."""
    from trl import SFTConfig

    from scripts.models import precision

    chosen = precision()
    return SFTConfig(
        output_dir=str(output_dir),
        learning_rate=config["learning_rate"],
        num_train_epochs=config["num_train_epochs"],
        max_steps=config["max_steps"],
        per_device_train_batch_size=config["per_device_train_batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        # examples over max_length are dropped before (tokenize_for_training); TRL refuses a max_length it would not
        # enforce on padding-free batches without packing
        max_length=None if config["padding_free"] and not config["packing"] else config["max_length"],
        warmup_steps=config["warmup_ratio"],  # transformers 5: a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=config["lr_scheduler_type"],
        seed=config["seed"],
        data_seed=config["seed"],
        gradient_checkpointing=config["gradient_checkpointing"],
        packing=config["packing"],
        padding_free=config["padding_free"],
        logging_steps=config["logging_steps"],
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config["save_steps"],
        save_total_limit=2,
        bf16=chosen.bf16,
        fp16=chosen.fp16,  # pre-Ampere GPUs: real fp16 mixed precision rather than emulated bf16
        report_to="none",
        ddp_find_unused_parameters=False,  # under accelerate launch: every LoRA weight gets a gradient each step
        # padded batches: their attention mask's ones; a padding-free row has no padding but may hold pad-token ids
        # (pad = eos in many tokenizers), which "non_padding" would leave out without its mask
        include_num_input_tokens_seen="all" if padding_free_collator(config) else "non_padding",
        dataset_num_proc=None,
    )


def _lora_config(config: dict):
    """LoRA on every linear layer of the model (PEFT's 'all-linear', which leaves the output head out)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config["lora_r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
        target_modules="all-linear", bias="none", task_type="CAUSAL_LM",
    )


def _result(run_dir: Path, saved: dict) -> dict:
    """What later stages get for a run: adapter folder, config used, summary, loss curve."""
    config = json.loads((run_dir / "config.json").read_text())
    return {"run_name": run_dir.name, "adapter_dir": str(run_dir / "adapter"), "config": config["training"],
            "summary": saved["summary"], "loss_curve": saved["loss_curve"]}


def _fmt(value: float | None) -> str:
    """A loss with 3 decimals, or '?'."""
    return "?" if value is None else f"{value:.3f}"


def train_stage(settings, train_set: dict | None, loader: Callable | None = None) -> dict:
    """Stage 4: train every TRAINING_CONFIGS entry on the stage-3 data set; {run name: result}."""
    from scripts.pre_proc import load_jsonl

    configs = validate_training_configs(settings.training_configs, seed=settings.seed)
    fingerprint = (train_set or {}).get("fingerprint")
    trainer = QLoRATrainer(settings.base_model_id, settings.results_dir, quantization=settings.quantization,
                           token=settings.hf_token, force=settings.force, loader=loader)
    if "train" not in settings.stages:
        return trainer.completed_runs(configs, fingerprint) if train_set else {}
    if train_set is None:
        raise UserError("the train stage needs the pre-processed data set: run the 'preprocess' stage too "
                        "(e.g. --stages preprocess,train)")
    return trainer.train_all(configs, load_jsonl(Path(train_set["path"])), fingerprint)
