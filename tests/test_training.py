"""Stage 4: config validation, the label mask, a real tiny LoRA run, adapter reload, resume and skip."""
import json
import logging
import shutil
import weakref

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from scripts.errors import UserError
from scripts.prompts import render
from scripts.training import (
    QLoRATrainer, _drop_padding_mask, _lora_config, _sft_config, halved_batch, run_name, tokenize_for_training,
)
from scripts.training_config import TRAINING_DEFAULTS, validate_training_configs
from tests.tiny_models import build_tiny_model, build_tokenizer

INIT_RANGE = 0.2  # large enough that the frozen output head lets a LoRA-only run lower the loss clearly
SCHEMA = "CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER);"
PAIRS = [
    ("How many singers are there?", "SELECT count(*) FROM singer"),
    ("List the names of all singers.", "SELECT name FROM singer"),
    ("What is the average age of singers?", "SELECT avg(age) FROM singer"),
    ("Which countries do singers come from?", "SELECT DISTINCT country FROM singer"),
]


def sft_rows(tokenizer) -> Dataset:
    """Prompt/completion rows for PAIRS, rendered by the one prompt function."""
    rendered = [render(tokenizer, SCHEMA, q, a) for q, a in PAIRS]
    return Dataset.from_dict({"prompt": [p for p, _ in rendered], "completion": [c for _, c in rendered]})


class TinyLoader:
    """Stands in for scripts.models.load_model_and_tokenizer; counts calls and checks for_training."""

    def __init__(self, kind: str = "chatml", arch: str = "llama") -> None:
        self.kind, self.arch, self.calls = kind, arch, 0

    def __call__(self, model_id, *, quantization, token, for_training, **extra):
        assert for_training is True
        self.calls, self.extra = self.calls + 1, extra
        tokenizer = build_tokenizer(self.kind)
        return build_tiny_model(tokenizer, arch=self.arch, seed=0, initializer_range=INIT_RANGE), tokenizer


class NaNAtStep(TinyLoader):
    """A tiny model whose embedding output turns NaN on the given training step (forward call)."""

    def __init__(self, step: int) -> None:
        super().__init__("chatml")
        self.step = step

    def __call__(self, model_id, **kwargs):
        model, tokenizer = super().__call__(model_id, **kwargs)
        calls = []

        def poison(module, inputs, output):
            calls.append(1)
            return output * float("nan") if len(calls) == self.step else output

        model.get_input_embeddings().register_forward_hook(poison)
        return model, tokenizer


def config(**overrides) -> dict:
    """A resolved config for a short CPU run."""
    base = {"learning_rate": 1e-2, "max_steps": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
            "max_length": 512, "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "gradient_checkpointing": False,
            "logging_steps": 1, "save_steps": 100}
    return validate_training_configs([{**base, **overrides}])[0]


def test_validation_fills_defaults_and_rejects_bad_entries():
    resolved = validate_training_configs([{"learning_rate": 1e-4}, {}], seed=7)
    assert resolved[0] == {**TRAINING_DEFAULTS, "learning_rate": 1e-4, "seed": 7}
    assert resolved[1]["lora_r"] == 16 and resolved[1]["lora_alpha"] == 32 and resolved[1]["lora_dropout"] == 0.05
    with pytest.raises(UserError, match=r"unknown key\(s\) \['lr'\].*allowed keys: learning_rate"):
        validate_training_configs([{"lr": 1e-4}])
    with pytest.raises(UserError, match=r"TRAINING_CONFIGS\[1\]\['learning_rate'\] must be a number"):
        validate_training_configs([{}, {"learning_rate": "2e-4"}])
    with pytest.raises(UserError, match=r"per_device_train_batch_size'\] must be an integer, got True"):
        validate_training_configs([{"per_device_train_batch_size": True}])
    with pytest.raises(UserError, match=r"max_steps'\] must be an integer"):
        validate_training_configs([{"max_steps": 10.0}])
    with pytest.raises(UserError, match=r"packing'\] must be a boolean"):
        validate_training_configs([{"packing": 1}])
    with pytest.raises(UserError, match=r"lora_dropout.*in \[0, 1\)"):
        validate_training_configs([{"lora_dropout": 1.5}])
    with pytest.raises(UserError, match="lr_scheduler_type"):
        validate_training_configs([{"lr_scheduler_type": "cosinus"}])
    with pytest.raises(UserError, match="non-empty list"):
        validate_training_configs([])
    assert validate_training_configs([{"attn_implementation": "eager"}])[0]["attn_implementation"] == "eager"
    with pytest.raises(UserError, match=r"attn_implementation'\] must be one of \('auto', 'eager'"):
        validate_training_configs([{"attn_implementation": "fast"}])


def test_run_name_is_stable_and_follows_config_model_and_data():
    a = run_name("org/My-Model", config(), "data1")
    assert a == run_name("org/My-Model", config(), "data1") and a.startswith("my-model-")
    assert a != run_name("org/My-Model", config(learning_rate=2e-2), "data1")
    assert a != run_name("org/My-Model", config(), "data2")
    assert a != run_name("org/Other", config(), "data1")
    # keys that came later: at their defaults they leave the name of a run of an earlier version as it was
    earlier = {k: v for k, v in config().items() if k not in ("attn_implementation", "drop_padding_mask")}
    assert a == run_name("org/My-Model", earlier, "data1")
    assert a != run_name("org/My-Model", config(attn_implementation="eager"), "data1")
    assert a != run_name("org/My-Model", config(drop_padding_mask=False), "data1")


def test_attention_implementation_reaches_the_loader(tmp_path):
    loader = TinyLoader("chatml")
    QLoRATrainer("tiny/chatml", tmp_path, loader=loader).train(config(max_steps=1), sft_rows(build_tokenizer("chatml")))
    assert loader.extra == {}  # "auto": the loader's (and model's) default
    QLoRATrainer("tiny/chatml", tmp_path, loader=loader).train(config(max_steps=1, attn_implementation="eager"),
                                                               sft_rows(build_tokenizer("chatml")))
    assert loader.extra == {"attn_implementation": "eager"}


def test_non_finite_gradients_stop_the_run_before_the_adapter_changes(tmp_path):
    """NaN at step 3: a clear error naming the step and the fix; the step-2 checkpoint holds finite weights only."""
    from safetensors.torch import load_file

    cfg = config(max_steps=6, save_steps=2)
    trainer = QLoRATrainer("tiny/chatml", tmp_path, loader=NaNAtStep(3))
    with pytest.raises(UserError, match=r"gradients of step 3 are not finite.*\"attn_implementation\": \"eager\""):
        trainer.train(cfg, sft_rows(build_tokenizer("chatml")), "data")
    run_dir = trainer.run_dir(cfg, "data")
    assert QLoRATrainer.completed(run_dir) is None and not (run_dir / "adapter").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    weights = load_file(run_dir / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def padded_batch(side: str) -> dict:
    """Three rows of 9, 5 and 2 tokens padded to 9 on one side; labels -100 on the pads and the first token."""
    torch.manual_seed(1)
    lengths, width = [9, 5, 2], 9
    ids, mask, labels = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long), None
    labels = torch.full((3, width), -100)
    for row, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, span] = torch.randint(5, 500, (n,))
        mask[row, span] = 1
        labels[row, span] = ids[row, span]
        labels[row, span.start] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The batch's loss and every parameter's gradient."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_dropping_the_padding_mask_is_exact_for_right_padded_batches(attention):
    """Same loss and gradients without the mask on a right-padded batch; a left-padded batch keeps its mask."""
    tokenizer = build_tokenizer("chatml")
    model = build_tiny_model(tokenizer, initializer_range=INIT_RANGE, attn_implementation=attention)
    right = padded_batch("right")
    loss, grads = loss_and_grads(model, right)
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    model.register_forward_pre_hook(_drop_padding_mask, with_kwargs=True)
    dropped_loss, dropped_grads = loss_and_grads(model, right)
    assert seen == [None]
    torch.testing.assert_close(dropped_loss, loss)
    for g, d in zip(grads, dropped_grads):
        torch.testing.assert_close(d, g, rtol=1e-4, atol=1e-6)
    # the mask does matter where it is kept: a left-padded batch differs without it
    left = padded_batch("left")
    _drop_padding_mask(model, (), kept := dict(left))
    assert kept["attention_mask"] is left["attention_mask"]
    assert not torch.allclose(model(**{**left, "attention_mask": None}).loss, model(**left).loss)


def test_training_runs_without_the_padding_mask_unless_told(tmp_path):
    class Spy(TinyLoader):
        def __call__(self, model_id, **kwargs):
            model, tokenizer = super().__call__(model_id, **kwargs)
            self.masks = []
            model.model.register_forward_pre_hook(
                lambda m, a, kw: self.masks.append(kw.get("attention_mask")), with_kwargs=True)
            return model, tokenizer

    rows = sft_rows(build_tokenizer("chatml"))  # 4 rows of different lengths: every batch of 4 is padded
    QLoRATrainer("tiny/chatml", tmp_path, loader=(spy := Spy())).train(config(max_steps=2), rows)
    assert len(spy.masks) == 2 and all(m is None for m in spy.masks)
    QLoRATrainer("tiny/chatml", tmp_path, loader=spy).train(config(max_steps=2, drop_padding_mask=False), rows)
    assert len(spy.masks) == 2 and all(m is not None and (m == 0).any() for m in spy.masks)


@pytest.mark.parametrize("kind", ["chatml", "base"])
def test_label_mask_from_the_sft_collator(kind, tmp_path):
    """Prompt tokens are -100; answer tokens and the end of turn are trained; exactly one end token, no double eos."""
    from trl import SFTTrainer

    tokenizer = build_tokenizer(kind)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = sft_rows(tokenizer)
    data, counts = tokenize_for_training(rows, tokenizer, max_length=512)
    assert counts == {"dropped_too_long": 0, "boundary_retokenized": 0}
    trainer = SFTTrainer(model=build_tiny_model(tokenizer), args=_sft_config(config(), tmp_path), train_dataset=data,
                         processing_class=tokenizer, peft_config=_lora_config(config()))
    batch = next(iter(trainer.get_train_dataloader()))
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>" if kind == "chatml" else "</s>")
    assert batch["labels"].shape == batch["input_ids"].shape
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()):
        length = sum(mask)
        trained = [i for i, label in enumerate(labels) if label != -100]
        answer = tokenizer.decode([ids[i] for i in trained])
        prompt = tokenizer.decode(ids[: trained[0]])
        completion_of = {r["prompt"]: r["completion"] for r in rows.to_list()}
        assert answer == completion_of[prompt]
        assert trained == list(range(trained[0], length))  # one block: answer through end of turn, then padding
        assert [labels[i] for i in trained] == [ids[i] for i in trained]
        assert ids[length - 1] == end_id and ids[length - 2] != end_id  # no double eos
        assert all(label == -100 for label in labels[length:])


def test_short_run_lowers_loss_saves_and_reloads_adapter(tmp_path):
    from peft import PeftModel

    loader = TinyLoader("chatml")
    trainer = QLoRATrainer("tiny/chatml", tmp_path, loader=loader)
    result = trainer.train(config(max_steps=30), sft_rows(build_tokenizer("chatml")), "data")
    summary = result["summary"]
    assert summary["loss_end"] < 0.5 * summary["loss_start"], summary
    assert summary["steps"] == 30 and summary["tokens_per_second"] > 0 and summary["peak_memory_gb"] > 0
    run_dir = tmp_path / result["run_name"]
    assert json.loads((run_dir / "config.json").read_text())["training"] == config(max_steps=30)
    log = json.loads((run_dir / "training_log.json").read_text())
    assert [step for step, _ in log["loss_curve"]] == list(range(1, 31))

    tokenizer = build_tokenizer("chatml")
    model = PeftModel.from_pretrained(build_tiny_model(tokenizer, seed=0, initializer_range=INIT_RANGE), result["adapter_dir"])
    prompt, completion = render(tokenizer, SCHEMA, *PAIRS[0])
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    generated = tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
    assert generated.startswith("SELECT"), generated  # the adapter learned the answer format
    base = build_tiny_model(tokenizer, seed=0, initializer_range=INIT_RANGE)
    assert not torch.equal(model(**enc).logits, base(**enc).logits)


class StopAfterCheckpoint(TrainerCallback):
    """Simulates an interruption right after the first checkpoint is written."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("simulated interruption")


class CountSteps(TrainerCallback):
    """Records the step a session starts from and how many steps it runs."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    rows = sft_rows(build_tokenizer("mistral_v3"))
    cfg = config(max_steps=4, save_steps=2)
    interrupted = QLoRATrainer("tiny/mistral", tmp_path, loader=TinyLoader("mistral_v3", "mistral"),
                               callbacks=[StopAfterCheckpoint()])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(cfg, rows, "data")
    run_dir = interrupted.run_dir(cfg, "data")
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir() and QLoRATrainer.completed(run_dir) is None
    before = json.loads((run_dir / "checkpoints" / "checkpoint-2" / "elapsed.json").read_text())
    assert before["step"] == 2 and before["seconds"] > 0

    counter = CountSteps()
    result = QLoRATrainer("tiny/mistral", tmp_path, loader=TinyLoader("mistral_v3", "mistral"),
                          callbacks=[counter]).train(cfg, rows, "data")
    assert result["summary"]["resumed_from"] == "checkpoint-2"
    assert counter.steps == 2 and result["summary"]["steps"] == 4
    assert [step for step, _ in result["loss_curve"]] == [1, 2, 3, 4]  # the log history survives the resume
    summary = result["summary"]  # the reported time covers both sessions, not only the resumed tail
    assert summary["train_seconds"] == pytest.approx(before["seconds"] + summary["session_seconds"], abs=0.02)
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens_trained"] / summary["train_seconds"], rel=0.05)


def test_completed_run_is_skipped_unless_forced(tmp_path):
    rows = sft_rows(build_tokenizer("base"))
    cfg = config(max_steps=2)
    loader = TinyLoader("base")
    first = QLoRATrainer("tiny/base", tmp_path, loader=loader).train(cfg, rows, "data")
    again = QLoRATrainer("tiny/base", tmp_path, loader=loader).train_all([cfg], rows, "data")
    assert loader.calls == 1 and again == {first["run_name"]: first}
    assert QLoRATrainer("tiny/base", tmp_path, loader=loader).completed_runs([cfg], "data") == again
    forced = QLoRATrainer("tiny/base", tmp_path, loader=loader, force=True).train(cfg, rows, "data")
    assert loader.calls == 2 and forced["summary"]["resumed_from"] is None


def test_stages_3_and_4_on_real_spider(real_spider, tmp_path):
    """preprocess_stage -> train_stage as main.py calls them, on a small sample of the real Spider train split."""
    from types import SimpleNamespace

    from scripts.pre_proc import load_jsonl, preprocess_stage
    from scripts.run_state import StageCache
    from scripts.spider_data import spider_set
    from scripts.spider_release import prepare_spider
    from scripts.training import train_stage

    loader = TinyLoader("chatml")
    settings = SimpleNamespace(
        base_model_id="tiny/chatml", training_configs=[{"max_steps": 2, "max_length": 4096, "logging_steps": 1}],
        sample_size_train=6, seed=3, schema_sample_rows=2, train_chat_file=tmp_path / "ft.jsonl",
        stages=("preprocess", "train"), results_dir=tmp_path / "results", quantization="none", hf_token=None, force=False,
    )
    models = SimpleNamespace(get=lambda adapter=None: loader("tiny/chatml", quantization="none", token=None, for_training=True))
    train = spider_set(prepare_spider(real_spider, tmp_path / "unused"), "train")
    train_set = preprocess_stage(settings, StageCache(tmp_path / "stages"), train, models)
    rows = load_jsonl(train_set["path"])
    assert train_set["stats"]["sampled"] == 6 and len(rows) == train_set["stats"]["kept"] > 0
    assert all(r["completion"].endswith("<|im_end|>") and "CREATE TABLE" in r["prompt"] for r in rows)

    runs = train_stage(settings, train_set, loader=loader)
    (name, run), = runs.items()
    assert run["summary"]["steps"] == 2 and run["config"]["seed"] == 3
    settings.stages = ("report",)  # train stage left out: the completed run is found, nothing retrains
    calls = loader.calls
    assert train_stage(settings, train_set, loader=loader) == runs and loader.calls == calls


# ----------------------------------------------------------------------------------------------- out of memory

class OutOfMemoryAbove(TrainerCallback):
    """A fake CUDA out-of-memory error at the start of each step from `from_step` on, while the batch exceeds `fits`."""

    def __init__(self, fits: int, from_step: int = 0) -> None:
        self.fits, self.from_step, self.raised, self.batches = fits, from_step, 0, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.batches.append((args.per_device_train_batch_size, args.gradient_accumulation_steps))
        if args.per_device_train_batch_size > self.fits and state.global_step >= self.from_step:
            self.raised += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                              "capacity of 14.56 GiB of which 1.06 GiB is free.")


def test_out_of_memory_retries_with_half_the_batch_from_the_last_checkpoint(tmp_path, caplog):
    """OOM at step 3 of batch 4 x 1: the run goes on at 2 x 2 from checkpoint-2, over the same examples."""
    rows = sft_rows(build_tokenizer("chatml"))
    cfg = config(max_steps=4, save_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    reference = QLoRATrainer("tiny/chatml", tmp_path / "reference", loader=TinyLoader()).train(cfg, rows, "data")
    oom, loader = OutOfMemoryAbove(fits=2, from_step=2), TinyLoader()
    trainer = QLoRATrainer("tiny/chatml", tmp_path / "capped", loader=loader, callbacks=[oom])
    with caplog.at_level(logging.WARNING, logger="scripts.training"):
        result = trainer.train(cfg, rows, "data")
    summary = result["summary"]
    assert oom.raised == 1 and loader.calls == 2  # the failed attempt's model was dropped and loaded again
    assert (summary["per_device_train_batch_size"], summary["gradient_accumulation_steps"]) == (2, 2)
    assert summary["oom_retries"] == 1 and summary["resumed_from"] == "checkpoint-2" and summary["steps"] == 4
    assert summary["tokens_trained"] == reference["summary"]["tokens_trained"]  # the same examples per step
    assert "out of memory in training at per-device batch 4 x 1" in caplog.text
    assert "retrying with 2 x 2 (the same effective batch of 4 examples), from the last checkpoint" in caplog.text
    run_dir = trainer.run_dir(cfg, "data")
    settled = json.loads((run_dir / "batch.json").read_text())
    assert (settled["per_device_train_batch_size"], settled["gradient_accumulation_steps"]) == (2, 2)
    # a rerun of the run from scratch (log and checkpoints gone) starts from the settled batch: no error again
    (run_dir / "training_log.json").unlink()
    shutil.rmtree(run_dir / "checkpoints")
    again = OutOfMemoryAbove(fits=2)
    rerun = QLoRATrainer("tiny/chatml", tmp_path / "capped", loader=loader, callbacks=[again]).train(cfg, rows, "data")
    assert again.raised == 0 and set(again.batches) == {(2, 2)} and rerun["summary"]["oom_retries"] == 1


def test_out_of_memory_at_batch_one_stops_with_what_to_change(tmp_path):
    oom = OutOfMemoryAbove(fits=0)
    trainer = QLoRATrainer("tiny/chatml", tmp_path, quantization="none", loader=TinyLoader(), callbacks=[oom])
    with pytest.raises(UserError) as caught:
        trainer.train(config(per_device_train_batch_size=3, gradient_accumulation_steps=2), sft_rows(build_tokenizer("chatml")))
    message = str(caught.value)
    assert oom.batches == [(3, 2), (1, 6)]  # 3 has no divisor but 1 below its half: 1 x 6, the same 6 examples
    assert "out of memory in training at per-device batch 1 x 6" in message and "no CUDA GPU" in message
    assert "the failed allocation asked for 2.00 GiB more" in message
    assert 'a lower "max_length" (now 512)' in message and '"gradient_checkpointing": true' in message
    assert "QUANTIZATION 4bit" in message


def test_out_of_memory_under_several_processes_is_not_retried(tmp_path, monkeypatch):
    from scripts import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    loader = TinyLoader()
    trainer = QLoRATrainer("tiny/chatml", tmp_path, loader=loader, callbacks=[OutOfMemoryAbove(fits=2)])
    with pytest.raises(UserError, match=r'Under accelerate launch the batch is not retried .*'
                                        r'"per_device_train_batch_size": 2 and "gradient_accumulation_steps": 2'):
        trainer.train(config(per_device_train_batch_size=4, gradient_accumulation_steps=1), sft_rows(build_tokenizer("chatml")))
    assert loader.calls == 1


@pytest.mark.parametrize("where", ["from_pretrained", "loader"])
def test_weights_that_do_not_fit_as_they_load_stop_at_once_without_halving_the_batch(tmp_path, monkeypatch, where):
    """Out of memory in the load, not in a training step: one load attempt, the DoesNotFit message, no batch.json."""
    import transformers

    from scripts.models import DoesNotFit
    from tests.tiny_models import save_tiny_model

    attempts = []

    def out_of_memory(*args, **kwargs):
        attempts.append(args)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.50 GiB")

    if where == "from_pretrained":  # the real loader: its weights run out of memory
        model_id, loader = str(save_tiny_model(tmp_path / "model")), None
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", out_of_memory)
    else:  # a loader that runs out of memory in its own steps (e.g. preparing 4-bit weights for training)
        model_id, loader = "tiny/chatml", out_of_memory
    trainer = QLoRATrainer(model_id, tmp_path / "runs", quantization="none", loader=loader)
    with pytest.raises(DoesNotFit) as caught:
        trainer.train(config(per_device_train_batch_size=8, gradient_accumulation_steps=2),
                      sft_rows(build_tokenizer("chatml")))
    message = str(caught.value)
    assert len(attempts) == 1
    assert f"{model_id!r} does not fit in memory: out of memory while its weights load" in message
    assert "QUANTIZATION to 4bit" in message and "in training" not in message
    assert not list((tmp_path / "runs").rglob("batch.json"))


def test_other_errors_are_not_retried(tmp_path):
    class Broken(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise RuntimeError("shape mismatch")

    loader = TinyLoader()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        QLoRATrainer("tiny/chatml", tmp_path, loader=loader, callbacks=[Broken()]).train(
            config(), sft_rows(build_tokenizer("chatml")))
    assert loader.calls == 1


def test_halved_batch_keeps_the_effective_batch():
    assert [halved_batch(n) for n in (1, 2, 3, 4, 5, 6, 8, 12)] == [None, 1, 1, 2, 1, 3, 4, 6]


def test_the_report_shows_the_settled_batch():
    from scripts.report import render_markdown

    retried = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "oom_retries": 1}
    results = {
        "settings": {"base_model_id": "m", "sample_size_eval": 5, "sample_size_train": 5, "mmlu_k_shot": 5,
                     "mmlu_per_subject": 1},
        "created": "now", "baseline": {"ex": {"ex": 0.1, "count": 5}, "mmlu": None}, "best_adapter": None,
        "best_mmlu": None, "regression": None,
        "runs": {"a": {"training": retried, "config": {}, "adapter_dir": "a", "ex": None},
                 "b": {"training": {}, "config": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2},
                       "adapter_dir": "b", "ex": None}},
    }
    report = render_markdown(results, [])
    assert "| batch x accumulation |" in report
    assert "| 4 x 4 (1 OOM retry) |" in next(line for line in report.splitlines() if line.startswith("| a "))
    assert "| 8 x 2 |" in next(line for line in report.splitlines() if line.startswith("| b "))  # an earlier run: its config
    assert "retried with half the per-device batch and twice the accumulation" in report and "`a`" in report


# ----------------------------------------------------------------------------------------------- precision, release

def test_fp16_mixed_precision_trains_float32_lora_weights(tmp_path, monkeypatch):
    """On a pre-Ampere GPU: fp16 AMP, and the LoRA weights float32 (TRL makes a 4-bit model's LoRA weights bf16)."""
    from safetensors.torch import load_file

    import scripts.models

    class HalfQuantized(TinyLoader):
        def __call__(self, model_id, **kwargs):
            model, tokenizer = super().__call__(model_id, **kwargs)
            model.half().is_loaded_in_4bit = True  # as TRL sees a 4-bit model
            return model, tokenizer

    class Flags(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.flags = (args.fp16, args.bf16)
            self.trainable = {p.dtype for p in model.parameters() if p.requires_grad}

    t4 = scripts.models.Precision(torch.float16, bf16=False, fp16=True, reason="a T4")
    monkeypatch.setattr(scripts.models, "precision", lambda *args, **kwargs: t4)
    flags = Flags()
    result = QLoRATrainer("tiny/chatml", tmp_path, loader=HalfQuantized(), callbacks=[flags]).train(
        config(max_steps=2), sft_rows(build_tokenizer("chatml")))
    assert flags.flags == (True, False) and flags.trainable == {torch.float32}
    assert result["summary"]["mixed_precision"] == "fp16" and result["summary"]["loss_end"] is not None
    weights = load_file(f"{result['adapter_dir']}/adapter_model.safetensors")
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}


def test_each_training_run_releases_its_model(tmp_path):
    class Watched(TinyLoader):
        models: list = []

        def __call__(self, model_id, **kwargs):
            model, tokenizer = super().__call__(model_id, **kwargs)
            self.models.append(weakref.ref(model))
            return model, tokenizer

    loader = Watched()
    QLoRATrainer("tiny/chatml", tmp_path, loader=loader).train(config(max_steps=1), sft_rows(build_tokenizer("chatml")))
    assert len(loader.models) == 1 and loader.models[0]() is None  # gone without the test collecting anything
