"""Tiny random causal LMs and tokenizers, built in-process and offline, for tests (no Hub access).

Tokenizer kinds (each a byte-level BPE trained on a small SQL + English corpus):
- "chatml":     ChatML template WITH a system role and a default system message (like SmolLM2-Instruct / Qwen);
                eos = <|im_end|>, no bos added by the tokenizer.
- "gemma":      template that REJECTS the system role with raise_exception (like Gemma / Mistral v0.1);
                turns end with <end_of_turn>, eos = <eos>, bos rendered by the template.
- "mistral_v3": [INST] ... [/INST] template (like Mistral-7B-Instruct-v0.3) that puts the system text into the
                LAST user turn only, so it disappears from the conversation once an answer follows.
- "base":       NO chat template and NO pad token; the tokenizer adds <s> (like open_llama_3b_v2, a base model).

`save_tiny_sentencepiece_model` writes OpenLLaMA's real form instead: a sentencepiece tokenizer.model, no
tokenizer.json (scripts/sentencepiece_tokenizer.py reads it).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

KINDS = ("chatml", "gemma", "mistral_v3", "base")

CORPUS = [
    "SELECT count(*) FROM singer",
    "SELECT name , country , age FROM singer ORDER BY age DESC",
    "SELECT avg(age) , min(age) , max(age) FROM singer WHERE country = 'France'",
    "SELECT T1.name FROM stadium AS T1 JOIN concert AS T2 ON T1.stadium_id = T2.stadium_id GROUP BY T2.stadium_id",
    "SELECT DISTINCT country FROM singer WHERE age > 20 LIMIT 1",
    "CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER);",
    "CREATE TABLE concert (concert_id INTEGER, concert_name TEXT, stadium_id INTEGER, year TEXT);",
    "You are a helpful assistant. Write one SQLite query that answers the question.",
    "Given the database schema below, answer the question with a single SQL query.",
    "How many singers do we have? What is the average age of all singers from France?",
    "Show the name and the release year of the song by the youngest singer.",
    "The quick brown fox jumps over the lazy dog. Instructions, schema, question and answer.",
    "### Instructions\n### Schema\n### Question\n### SQL\n",
]

_SPECIALS = {
    "chatml": {"bos": "<|im_start|>", "eos": "<|im_end|>", "unk": "<|endoftext|>", "pad": "<|im_end|>",
               "extra": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]},
    "gemma": {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>",
              "extra": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]},
    "mistral_v3": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None,
                   "extra": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]},
    "base": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None, "extra": ["<unk>", "<s>", "</s>"]},
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named Tiny.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

MISTRAL_V3_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.last and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
    "{% endif %}"
    "{% endfor %}"
)

_TEMPLATES = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE, "mistral_v3": MISTRAL_V3_TEMPLATE, "base": None}


@functools.lru_cache(maxsize=None)
def _trained_bpe_json(kind: str, vocab_size: int) -> str:
    """A byte-level BPE trained on CORPUS with this kind's special tokens, as JSON (cached: training is the slow part)."""
    specials = _SPECIALS[kind]
    tok = Tokenizer(models.BPE(unk_token=specials["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials["extra"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if kind == "base":  # a Llama-style base tokenizer prepends <s> to every encoded text
        bos_id = tok.token_to_id(specials["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{specials['bos']} $A", pair=f"{specials['bos']} $A {specials['bos']} $B",
            special_tokens=[(specials["bos"], bos_id)],
        )
    return tok.to_str()


def build_tokenizer(kind: str = "chatml", vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A fresh tokenizer of one of KINDS (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose from {KINDS}")
    specials = _SPECIALS[kind]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe_json(kind, vocab_size)),
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        unk_token=specials["unk"],
        pad_token=specials["pad"],
    )
    if _TEMPLATES[kind] is not None:
        tokenizer.chat_template = _TEMPLATES[kind]
    return tokenizer


def tiny_llama_config(tokenizer, **overrides) -> LlamaConfig:
    """A Llama-style config of a few hundred thousand parameters sized to the tokenizer."""
    values = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_mistral_config(tokenizer, **overrides) -> MistralConfig:
    """A Mistral-style config (sliding window attention) of the same tiny size."""
    values = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, sliding_window=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    values.update(overrides)
    return MistralConfig(**values)


def build_tiny_model(tokenizer, arch: str = "llama", seed: int = 0, **config_overrides):
    """A random tiny causal LM (arch "llama" or "mistral") whose vocabulary matches the tokenizer.

    With the default initializer_range (0.02) the frozen output head keeps logits near uniform, so a LoRA-only run
    cannot lower the loss much; pass e.g. initializer_range=0.2 for tests that need a visible drop.
    """
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(tiny_llama_config(tokenizer, **config_overrides))
    elif arch == "mistral":
        model = MistralForCausalLM(tiny_mistral_config(tokenizer, **config_overrides))
    else:
        raise ValueError(f"unknown arch {arch!r}; choose 'llama' or 'mistral'")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_tokenizer(folder: Path, kind: str = "chatml") -> Path:
    """Save a tokenizer of this kind so AutoTokenizer.from_pretrained(folder) loads it."""
    folder = Path(folder)
    build_tokenizer(kind).save_pretrained(folder)
    return folder


def save_tiny_model(folder: Path, kind: str = "chatml", arch: str = "llama", seed: int = 0) -> Path:
    """Save tokenizer and random model together so AutoTokenizer/AutoModelForCausalLM.from_pretrained(folder) load them."""
    folder = Path(folder)
    tokenizer = build_tokenizer(kind)
    tokenizer.save_pretrained(folder)
    build_tiny_model(tokenizer, arch=arch, seed=seed).save_pretrained(folder)
    return folder


def save_tiny_sentencepiece_model(folder: Path, vocab_size: int = 512, seed: int = 0) -> tuple[Path, bytes]:
    """(folder, tokenizer.model bytes): a tiny Llama beside a sentencepiece tokenizer laid out as OpenLLaMA's on the Hub.

    tokenizer.model + a "LlamaTokenizer" tokenizer_config.json, no tokenizer.json, no pad token, no chat template:
    the form transformers 5 cannot load without protobuf (it converts to a fast tokenizer).
    """
    from bench.seed_models import train_sentencepiece, write_sentencepiece_tokenizer

    folder = Path(folder)
    model_bytes = train_sentencepiece(CORPUS * 4, vocab_size)
    write_sentencepiece_tokenizer(folder, model_bytes)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder, model_bytes
