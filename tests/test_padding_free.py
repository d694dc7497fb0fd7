"""padding_free: a batch's examples in one row train as each alone; the pipeline runs it and counts real tokens."""
import json

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM

from scripts.errors import UserError
from scripts.prompts import render
from scripts.training import QLoRATrainer, _lora_config, _sft_config, check_padding_free, tokenize_for_training
from tests.test_training import INIT_RANGE, SCHEMA, TinyLoader, config, sft_rows
from tests.tiny_models import build_tiny_model, build_tokenizer

LONG_SCHEMA = SCHEMA + "\nCREATE TABLE concert (concert_id INTEGER, concert_name TEXT, stadium_id INTEGER, year TEXT);"
EXAMPLES = [  # three lengths far apart: one schema, two schemas, two schemas and a long question
    (SCHEMA, "How many singers?", "SELECT count(*) FROM singer"),
    (LONG_SCHEMA, "List the names of all singers older than 30, by age.",
     "SELECT name FROM singer WHERE age > 30 ORDER BY age"),
    (LONG_SCHEMA, "For every concert held in a year after 2014, show the concert name, the year and the names of "
                  "the singers who are from France, ordered by the year of the concert and then by name.",
     "SELECT T1.concert_name , T1.year FROM concert AS T1 WHERE T1.year > 2014 ORDER BY T1.year"),
]


def tiny_qwen2(tokenizer, attention: str) -> Qwen2ForCausalLM:
    """A Qwen2-style model (biased q/k/v projections) of the tiny models' size."""
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=INIT_RANGE,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation=attention))


def tiny_model(arch: str, tokenizer, attention: str):
    """A random tiny llama, mistral or qwen2 with this attention implementation."""
    if arch == "qwen2":
        return tiny_qwen2(tokenizer, attention)
    return build_tiny_model(tokenizer, arch=arch, initializer_range=INIT_RANGE, attn_implementation=attention)


def three_examples(tokenizer) -> Dataset:
    """EXAMPLES tokenized as the pipeline does (prompt labels -100), lengths checked to differ."""
    rendered = [render(tokenizer, schema, q, a) for schema, q, a in EXAMPLES]
    rows = Dataset.from_dict({"prompt": [p for p, _ in rendered], "completion": [c for _, c in rendered]})
    data, _ = tokenize_for_training(rows, tokenizer, max_length=512)
    lengths = [len(ids) for ids in data["input_ids"]]
    assert len(set(lengths)) == 3 and max(lengths) - min(lengths) > 40, lengths
    return data


def padding_free_trainer(model, tokenizer, data: Dataset, tmp_path, checkpointing: bool = False):
    """The pipeline's SFTTrainer for padding_free (no LoRA dropout), with every LoRA weight random (B too)."""
    from trl import SFTTrainer

    cfg = config(padding_free=True, lora_dropout=0.0, gradient_checkpointing=checkpointing)
    trainer = SFTTrainer(model=model, args=_sft_config(cfg, tmp_path), train_dataset=data, processing_class=tokenizer,
                         peft_config=_lora_config(cfg))
    if checkpointing:  # as Trainer.train turns it on
        trainer.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    torch.manual_seed(1)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would leave A's gradients zero
            parameter.data.normal_(0, 0.1)
    return trainer


def loss_and_grads(trainer, batches: list[dict], answer_tokens: int) -> tuple[torch.Tensor, dict]:
    """The summed loss of these batches (each over all answer tokens, as one optimizer step) and the LoRA gradients."""
    trainer.model.zero_grad()
    loss = sum(trainer.compute_loss(trainer.model, dict(b), num_items_in_batch=answer_tokens) for b in batches)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch,attention,checkpointing", [
    ("llama", "sdpa", False), ("llama", "eager", False), ("llama", "sdpa", True), ("mistral", "sdpa", False),
    ("qwen2", "sdpa", False), ("qwen2", "eager", False)])
def test_a_packed_row_gives_each_example_its_loss_and_gradients_alone(arch, attention, checkpointing, tmp_path):
    """Collated by the trainer's own collator and run through its compute_loss: packed == alone == right-padded."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = build_tokenizer("chatml")
    data = three_examples(tokenizer)
    trainer = padding_free_trainer(tiny_model(arch, tokenizer, attention), tokenizer, data, tmp_path, checkpointing)
    examples = [trainer.train_dataset[i] for i in range(3)]
    answer_tokens = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    packed = trainer.data_collator(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    assert packed["position_ids"][0].tolist() == [i for e in examples for i in range(len(e["input_ids"]))]

    alone_loss, alone_grads = loss_and_grads(trainer, [trainer.data_collator([e]) for e in examples], answer_tokens)
    packed_loss, packed_grads = loss_and_grads(trainer, [packed], answer_tokens)
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)  # today's batches
    padded_loss, padded_grads = loss_and_grads(trainer, [padded], answer_tokens)
    torch.testing.assert_close(packed_loss, alone_loss)
    torch.testing.assert_close(padded_loss, alone_loss)
    assert packed_grads.keys() == alone_grads.keys() and any("lora_A" in n for n in packed_grads)
    for name, grad in alone_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the restarts are what keeps them apart: the same row with positions running on lets examples see each other
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
    assert not torch.allclose(loss_and_grads(trainer, [leaky], answer_tokens)[0], alone_loss, rtol=1e-3)


def test_padding_free_trains_saves_the_adapter_and_counts_the_same_real_tokens(tmp_path):
    rows = sft_rows(build_tokenizer("chatml"))  # 4 examples: every step of batch 4 sees them all
    tokenizer = build_tokenizer("chatml")
    lengths = [len(ids) for ids in tokenize_for_training(rows, tokenizer, 512)[0]["input_ids"]]
    padded = QLoRATrainer("tiny/chatml", tmp_path, quantization="none", loader=TinyLoader()).train(
        config(max_steps=3), rows, "data")
    free = QLoRATrainer("tiny/chatml", tmp_path, quantization="none", loader=TinyLoader()).train(
        config(max_steps=3, padding_free=True), rows, "data")
    assert free["run_name"] != padded["run_name"]
    summary = free["summary"]
    assert summary["steps"] == 3 and all(torch.isfinite(torch.tensor(loss)) for _, loss in free["loss_curve"])
    assert (tmp_path / free["run_name"] / "adapter" / "adapter_model.safetensors").exists()
    assert QLoRATrainer.completed(tmp_path / free["run_name"]) is not None
    # real tokens only, padded or not: the eos that doubles as this tokenizer's pad is counted, the padding is not
    assert tokenizer.pad_token == tokenizer.eos_token
    assert summary["tokens_trained"] == padded["summary"]["tokens_trained"] == 3 * sum(lengths)
    assert summary["tokens_counted"] == padded["summary"]["tokens_counted"] == "non_padding"
    assert summary["loss_start"] == pytest.approx(padded["summary"]["loss_start"], rel=1e-4)  # the same first step
    saved = json.loads((tmp_path / free["run_name"] / "config.json").read_text())
    assert saved["training"]["padding_free"] is True
    # TRL's packing collates padding-free too: the 4 examples fit one packed sequence, so each step sees them all
    packed = QLoRATrainer("tiny/chatml", tmp_path, quantization="none", loader=TinyLoader()).train(
        config(max_steps=3, packing=True), rows, "data")
    assert packed["summary"]["tokens_trained"] == 3 * sum(lengths)


def test_padding_free_reaches_the_collator_and_keeps_max_length_checked_upstream(tmp_path):
    args = _sft_config(config(padding_free=True), tmp_path)
    assert args.padding_free and args.max_length is None and args.include_num_input_tokens_seen == "all"
    padded = _sft_config(config(), tmp_path)
    assert not padded.padding_free and padded.max_length == 512 and padded.include_num_input_tokens_seen == "non_padding"
    packed = _sft_config(config(packing=True), tmp_path)  # TRL's BFD packing collates padding-free too
    assert packed.max_length == 512 and packed.include_num_input_tokens_seen == "all"


class NotMasked(torch.nn.Module):
    """A model class from a module without transformers' mask builders (like a recurrent model's)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config


def test_padding_free_is_refused_where_examples_would_see_each_other(tmp_path, monkeypatch):
    tokenizer = build_tokenizer("chatml")
    on = config(padding_free=True)
    model = tiny_qwen2(tokenizer, "sdpa")
    check_padding_free(model, on, "r")  # the supported case: nothing raised
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UserError, match=r'"padding_free": true puts .* linear_attention layers pass state'):
        check_padding_free(model, on, "r")
    check_padding_free(model, config(), "r")  # padded batches: nothing to check
    with pytest.raises(UserError, match=r"NotMasked does not build its attention mask with transformers' masking_utils"):
        check_padding_free(NotMasked(tiny_qwen2(tokenizer, "sdpa").config), on, "r")
    with pytest.raises(UserError, match=r'"packing": true .* leave "packing": true out'):
        check_padding_free(NotMasked(tiny_qwen2(tokenizer, "sdpa").config), config(packing=True), "r")

    import scripts.training

    monkeypatch.setattr(scripts.training, "PADDING_FREE_ATTENTION", ("eager",))  # as if sdpa kept no boundaries
    loader = TinyLoader()
    with pytest.raises(UserError, match=r"""'sdpa' attention would let them see each other: set "attn_implementation\""""):
        QLoRATrainer("tiny/chatml", tmp_path, quantization="none", loader=loader).train(
            config(padding_free=True), sft_rows(tokenizer))
    assert loader.calls == 1 and not list(tmp_path.rglob("checkpoint-*"))
