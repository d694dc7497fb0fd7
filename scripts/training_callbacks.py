"""Stage 4's Trainer callbacks: training time over resumed sessions, and the stop on non-finite gradients.

Imported by scripts/training.py only when a run trains: transformers' TrainerCallback brings in the Trainer's
imports (peft, and with it bitsandbytes when installed), which the evaluation stages never need.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

from scripts.errors import UserError
from scripts.run_state import write_json

log = logging.getLogger(__name__)

ELAPSED_FILE = "elapsed.json"  # in each checkpoint: training seconds up to it, so a resumed run reports its whole time


class SessionStats(TrainerCallback):
    """Trainer callback: training seconds over every session of a run, recorded in each checkpoint it saves."""

    def __init__(self, seconds_before: float = 0.0) -> None:
        self.seconds_before = seconds_before
        self.started = time.perf_counter()

    @classmethod
    def resumed_from(cls, checkpoint: str | None) -> "SessionStats":
        """Stats that start from the training seconds a checkpoint recorded (0 for a fresh run or no record)."""
        if not checkpoint:
            return cls()
        record = Path(checkpoint) / ELAPSED_FILE
        if not record.exists():
            log.warning("%s has no %s: the reported training time counts this part of the resumed run only",
                        checkpoint, ELAPSED_FILE)
            return cls()
        return cls(float(json.loads(record.read_text())["seconds"]))

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.started = time.perf_counter()

    def session_seconds(self) -> float:
        """Seconds since this part of the run (this call of Trainer.train) began."""
        return time.perf_counter() - self.started

    def seconds(self) -> float:
        """Seconds of training so far: earlier sessions (up to the checkpoint resumed from) plus this one."""
        return self.seconds_before + self.session_seconds()

    def on_save(self, args, state, control, **kwargs) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_json(folder / ELAPSED_FILE, {"seconds": round(self.seconds(), 3), "step": state.global_step})


class StopOnNonFiniteGradients(TrainerCallback):
    """Trainer callback: stop the run before an optimizer step would write NaN or inf into the adapter."""

    def __init__(self, run: str) -> None:
        self.run = run

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            raise UserError(
                f"run {self.run}: the gradients of step {state.global_step + 1} are not finite (NaN or inf), so "
                "training stopped before they reached the adapter; its checkpoints are from earlier steps. A known "
                "cause is PyTorch's memory-efficient attention backward on masked batches (pytorch/pytorch#178251), "
                'which "drop_padding_mask": true (the default) avoids: add "attn_implementation": "eager" to this '
                "TRAINING_CONFIGS entry (a new run), or lower its learning_rate")
