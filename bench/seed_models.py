"""Random-weight models of the seeds' exact layouts, to measure memory and speed on a GPU (with bench/capped_run.py).

Usage: python -m bench.seed_models {open_llama_3b,mistral_7b} --out DIR [--corpus DIR] [--tiny] [--seed 0]

- open_llama_3b: the layout of openlm-research/open_llama_3b_v2 (LlamaConfig: 26 layers, hidden 3200, 32 heads,
  intermediate 8640, vocabulary 32000, 2048 positions; 3.4 B parameters, 6.9 GB in bf16), and its tokenizer's
  form: a sentencepiece `tokenizer.model`, no `tokenizer.json`, `"tokenizer_class": "LlamaTokenizer"`, bos added,
  no chat template. The pipeline reads it as it reads the real one (scripts/sentencepiece_tokenizer.py). Needs
  the `sentencepiece` package, here to train the tokenizer and in the pipeline to read it.
- mistral_7b: the layout of mistralai/Mistral-7B-v0.3 (MistralConfig: 32 layers, hidden 4096, 32 heads, 8 KV heads,
  intermediate 14336, vocabulary 32768, rope_theta 1e6, 32768 positions, no sliding window; 7.2 B parameters,
  14.5 GB in bf16) with a fast `tokenizer.json` (byte-fallback BPE, built with `tokenizers`: no sentencepiece
  needed) and the [INST] chat template of Mistral-7B-Instruct-v0.3.

The tokenizer is trained on the text of --corpus (a Spider folder: questions, SQL, table and column names; or
data/demo, the default) and filled to the exact vocabulary size with control tokens that text never produces; the
richer the corpus, the closer its token counts are to the real tokenizer's. The weights are random (normal, std
0.02), built on the GPU when there is one (`with torch.device("cuda")`) and saved as bf16 safetensors. A random
model never emits eos, so generation always runs to max_new_tokens: the worst case for time and memory.
--tiny keeps the tokenizer and vocabulary and shrinks the rest (2 layers, hidden 64): a CPU smoke test.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("bench.seed_models")

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "demo"
LAYOUTS = {
    "open_llama_3b": dict(
        model_type="llama", vocab_size=32000, hidden_size=3200, num_hidden_layers=26, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=8640, max_position_embeddings=2048, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    ),
    "mistral_7b": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=32768, rope_theta=1e6,
        sliding_window=None, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    ),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# Mistral-7B-Instruct-v0.3's template without its tool-calling branches: the system text goes into the last user turn.
MISTRAL_V3_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


# ---------------------------------------------------------------------------------------------------------- corpus

def corpus_lines(folder: Path) -> list[str]:
    """Questions and SQL of every *.json list in folder, table and column names of tables.json, lines of *.sql files."""
    folder = Path(folder)
    lines: list[str] = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            continue
        for item in data:
            if not isinstance(item, dict):
                continue
            lines += [str(item[k]) for k in ("question", "query") if item.get(k)]
            if "table_names_original" in item:  # Spider's tables.json: the schema's names
                lines.append(" ".join(item["table_names_original"]))
                lines.append(" ".join(name for _, name in item.get("column_names_original", [])))
    for path in sorted(folder.rglob("*.sql")):
        lines += [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"--corpus {folder}: no questions, SQL or schema text found (give a Spider folder or data/demo)")
    return lines


# ---------------------------------------------------------------------------------------------------------- tokenizers

def train_sentencepiece(lines: list[str], vocab_size: int) -> bytes:
    """A sentencepiece BPE model (unk 0, bos 1, eos 2, byte fallback) of exactly vocab_size pieces, as its file bytes.

    A small corpus has fewer merges than vocab_size: the rest is filled with control symbols <unused_N>.
    """
    import sentencepiece as spm

    def train(filler: int) -> bytes:
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0, split_digits=True,
            hard_vocab_limit=False, control_symbols=[f"<unused_{i}>" for i in range(filler)], num_threads=1,
            minloglevel=2,
        )
        return out.getvalue()

    filler = 0
    for _ in range(3):
        model = train(filler)
        size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
        if size == vocab_size:
            return model
        filler += vocab_size - size
    raise RuntimeError(f"sentencepiece training gave {size} pieces, not {vocab_size}")


def write_sentencepiece_tokenizer(folder: Path, model: bytes, model_max_length: int = 2048) -> Path:
    """A tokenizer folder as OpenLLaMA's on the Hub: tokenizer.model and a LlamaTokenizer config, no tokenizer.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model)

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"), "eos_token": added("</s>"),
              "unk_token": added("<unk>"), "pad_token": None, "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
    return folder


def build_bpe_tokenizer(lines: list[str], vocab_size: int, specials: tuple[str, ...] = ("<unk>", "<s>", "</s>",
                                                                                        "[INST]", "[/INST]")):
    """A Llama/Mistral-style fast tokenizer (byte-fallback BPE on ▁-prefixed words, bos added) of exactly vocab_size.

    Ids: the specials, the 256 byte pieces <0x00>..<0xFF>, the learned pieces, then control tokens [control_N]
    up to vocab_size. Built with `tokenizers` alone (no sentencepiece).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    learner = Tokenizer(models.BPE(unk_token=specials[0], byte_fallback=True))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learned_size = vocab_size - len(specials) - 256
    learner.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=learned_size, special_tokens=list(specials),
                                                           show_progress=False))
    spec = json.loads(learner.to_str())
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [
        {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, token in enumerate(list(specials) + [f"[control_{n}]" for n in range(vocab_size - len(vocab))])
    ]
    for entry in spec["added_tokens"][len(specials):]:
        entry["id"] = len(vocab) + entry["id"] - len(specials)
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{specials[1]} $A",
                                                             special_tokens=[(specials[1], 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=specials[0], bos_token=specials[1],
                                   eos_token=specials[2])
    if len(fast) != vocab_size:
        raise RuntimeError(f"the BPE tokenizer has {len(fast)} tokens, not {vocab_size}")
    return fast


# ---------------------------------------------------------------------------------------------------------- model

def model_config(name: str, tiny: bool = False):
    """The transformers config of a layout (LAYOUTS), shrunk for --tiny."""
    from transformers import AutoConfig

    values = dict(LAYOUTS[name])
    if tiny:
        values.update(TINY, num_key_value_heads=TINY["num_attention_heads"] // (4 if name == "mistral_7b" else 1))
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_model(config, seed: int = 0):
    """Random weights of this config in bf16, built on the GPU when there is one."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def seed_model(name: str, out: Path, corpus: Path = DEFAULT_CORPUS, tiny: bool = False, seed: int = 0) -> dict:
    """Write the layout's model and tokenizer into out; a summary of what was written."""
    out = Path(out)
    config = model_config(name, tiny)
    lines = corpus_lines(corpus)
    if name == "open_llama_3b":
        import importlib.util

        if importlib.util.find_spec("sentencepiece") is None:
            raise SystemExit("open_llama_3b needs the sentencepiece package (its tokenizer is a sentencepiece "
                             "tokenizer.model, as the real model's): pip install sentencepiece")
        write_sentencepiece_tokenizer(out, train_sentencepiece(lines, config.vocab_size),
                                      config.max_position_embeddings)
    else:
        tokenizer = build_bpe_tokenizer(lines, config.vocab_size)
        tokenizer.chat_template = MISTRAL_V3_TEMPLATE
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(out)
    model = build_model(config, seed)
    model.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    from scripts.models import load_tokenizer

    tokenizer = load_tokenizer(str(out))  # the pipeline's own loader: what a run will see
    if len(tokenizer) != config.vocab_size:
        raise RuntimeError(f"{out}: the tokenizer has {len(tokenizer)} tokens, the model {config.vocab_size}")
    sample = lines[: min(len(lines), 200)]
    tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
    summary = {"layout": name, "tiny": tiny, "out": str(out), "parameters": parameters,
               "vocab_size": config.vocab_size, "tokenizer": type(tokenizer).__name__,
               "corpus": str(corpus), "corpus_lines": len(lines),
               "chars_per_token": round(sum(map(len, sample)) / max(1, tokens), 2),
               "weights_gb": round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e9, 3)}
    (out / "seed_model.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, write the model, print its summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", choices=sorted(LAYOUTS))
    parser.add_argument("--out", type=Path, required=True, help="folder to write (config, weights, tokenizer)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="text to train the tokenizer on: a Spider folder or data/demo (default)")
    parser.add_argument("--tiny", action="store_true", help="2 layers of hidden 64, same tokenizer (CPU smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(seed_model(args.layout, args.out, args.corpus, args.tiny, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
