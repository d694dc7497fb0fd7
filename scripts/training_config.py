"""A TRAINING_CONFIGS entry: its allowed keys, their types, ranges and defaults, checked before any model loads."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from scripts.errors import UserError

# Allowed keys of a TRAINING_CONFIGS entry, with their defaults.
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,  # AdamW peak learning rate
    "num_train_epochs": 1.0,  # passes over the train set (ignored when max_steps > 0)
    "max_steps": -1,  # optimizer steps; -1 = use num_train_epochs
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,  # effective batch = batch size x accumulation
    "max_length": 1024,  # tokens per example; longer examples are dropped (and counted)
    "warmup_ratio": 0.03,  # fraction of the steps with linear warm-up
    "lr_scheduler_type": "cosine",
    "seed": 0,  # default: SEED of main.py
    "gradient_checkpointing": True,  # less memory, ~30% slower
    "packing": False,  # pack several examples per sequence (TRL BFD packing)
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "logging_steps": 10,
    "save_steps": 100,  # checkpoint every N steps (resume point)
    "attn_implementation": "auto",  # "auto" = the model's default (sdpa); "eager" where sdpa's backward gives NaN
    "drop_padding_mask": True,  # right-padded batches run causal attention alone: exact, and sdpa's flash kernel
    "padding_free": False,  # a batch's examples in one row with their own position ids: no compute on padding
}
ATTENTION = ("auto", "eager", "sdpa", "flash_attention_2", "flex_attention")
_NUMBER, _INT, _BOOL, _STR = "a number", "an integer", "a boolean", "a string"
_KEY_TYPES = {
    "learning_rate": _NUMBER, "num_train_epochs": _NUMBER, "max_steps": _INT, "per_device_train_batch_size": _INT,
    "gradient_accumulation_steps": _INT, "max_length": _INT, "warmup_ratio": _NUMBER, "lr_scheduler_type": _STR,
    "seed": _INT, "gradient_checkpointing": _BOOL, "packing": _BOOL, "lora_r": _INT, "lora_alpha": _NUMBER,
    "lora_dropout": _NUMBER, "logging_steps": _INT, "save_steps": _INT, "attn_implementation": _STR,
    "drop_padding_mask": _BOOL, "padding_free": _BOOL,
}
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": (lambda v: 0 < v < 1, "in (0, 1)"),
    "num_train_epochs": (lambda v: v > 0, "> 0"),
    "max_steps": (lambda v: v == -1 or v > 0, "-1 or > 0"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "max_length": (lambda v: v >= 16, ">= 16"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora_r": (lambda v: v >= 1, ">= 1"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "logging_steps": (lambda v: v >= 1, ">= 1"),
    "save_steps": (lambda v: v >= 1, ">= 1"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "attn_implementation": (lambda v: v in ATTENTION, f"one of {ATTENTION}"),
}
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


def _type_ok(value: Any, kind: str) -> bool:
    """Whether a value has the key's type (bools are not numbers here)."""
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == _INT else isinstance(value, (int, float)) and math.isfinite(value)


def validate_training_configs(configs: Any, seed: int = 0) -> list[dict]:
    """Check every TRAINING_CONFIGS entry (keys, types, ranges) before any model loads; return them with defaults."""
    allowed = ", ".join(f"{k} ({_KEY_TYPES[k]}, default {v!r})" for k, v in TRAINING_DEFAULTS.items())
    if not isinstance(configs, list) or not configs:
        raise UserError("TRAINING_CONFIGS (main.py, .env or --training-configs) must be a non-empty list of dicts; "
                        f"allowed keys: {allowed}")
    resolved = []
    for i, config in enumerate(configs):
        where = f"TRAINING_CONFIGS[{i}]"
        if not isinstance(config, dict):
            raise UserError(f"{where} must be a dict of hyper-parameters, got {type(config).__name__}; allowed keys: {allowed}")
        unknown = sorted(set(config) - set(TRAINING_DEFAULTS))
        if unknown:
            raise UserError(f"{where} has unknown key(s) {unknown}; allowed keys: {allowed}")
        for key, value in config.items():
            if not _type_ok(value, _KEY_TYPES[key]):
                raise UserError(f"{where}[{key!r}] must be {_KEY_TYPES[key]}, got {value!r}; allowed keys: {allowed}")
            check = _RANGES.get(key)
            if check and not check[0](value):
                raise UserError(f"{where}[{key!r}] must be {check[1]}, got {value!r}")
        if config.get("lr_scheduler_type", "cosine") not in SCHEDULERS:
            raise UserError(f"{where}['lr_scheduler_type'] must be one of {SCHEDULERS}, got {config['lr_scheduler_type']!r}")
        resolved.append({**TRAINING_DEFAULTS, "seed": seed, **config})
    return resolved
