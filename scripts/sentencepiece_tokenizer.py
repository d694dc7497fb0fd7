"""The slow tokenizer of the model loader (scripts/models.py): sentencepiece's own ids for a `tokenizer.model`.

OpenLLaMA ships a sentencepiece `tokenizer.model` and no `tokenizer.json`. transformers 5 ignores `use_fast=False`
and converts such a file into a fast tokenizer, which needs protobuf (without it the load fails with
"`tiktoken` is required"), and its authors advise against the converted tokenizer. `SentencePieceTokenizer`
encodes with `sentencepiece.SentencePieceProcessor` itself:

- `tokenizer(text)["input_ids"] == [bos] + sp.encode(text)` (bos / eos as `add_bos_token` / `add_eos_token` say);
- special tokens written in the text (`<s>`, `</s>`: the plain prompt format and its completions) are split out
  first and become their ids, the text between them is `sp.encode`d;
- decoding is `sp.decode` of the runs between special tokens (byte-fallback pieces become their characters).

It builds on transformers' `SentencePieceBackend` (a `PreTrainedTokenizer`: padding, batching, `save_pretrained`,
`from_pretrained`), in its legacy mode, which needs no protobuf. A pad token is not added here: the loader gives a
tokenizer without one its unk token (scripts.models.ensure_pad_token).
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

VOCAB_FILE = "tokenizer.model"
_PATTERNS = {(True, False): "bos", (True, True): "bos_eos", (False, True): "eos", (False, False): "none"}


class SentencePieceTokenizer(SentencePieceBackend):
    """A PreTrainedTokenizer whose ids are sentencepiece's own (plus bos), for a folder or Hub id with tokenizer.model."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str | None = "<unk>",
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        pad_token: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        **kwargs,
    ) -> None:
        for ignored in ("legacy", "special_tokens_pattern", "clean_up_tokenization_spaces"):
            kwargs.pop(ignored, None)  # set below; the Hub's LlamaTokenizer config may hold them
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        super().__init__(
            vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
            legacy=True,  # encode each text as sentencepiece does (the non-legacy mode rewrites the model: protobuf)
            special_tokens_pattern=_PATTERNS[self.add_bos_token, self.add_eos_token],
            clean_up_tokenization_spaces=False, add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token,
            **kwargs,
        )

    def save_pretrained(self, save_directory, *args, **kwargs) -> tuple[str, ...]:
        """transformers' save, plus add_bos_token / add_eos_token in tokenizer_config.json (it leaves them out)."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = Path(save_directory) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return files

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        """sp.decode of each run of ordinary ids; special and added tokens as their text (or left out)."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        marked = set(self.all_special_ids) | set(self._added_tokens_decoder)
        special = set(self.all_special_ids)
        parts: list[str] = []
        run: list[int] = []
        for index in ids:
            if index not in marked:
                run.append(index)
                continue
            if run:
                parts.append(self.sp_model.decode(run))
                run = []
            if not (skip_special_tokens and index in special):
                parts.append(self._added_tokens_decoder[index].content if index in self._added_tokens_decoder
                             else self.sp_model.id_to_piece(index))
        if run:
            parts.append(self.sp_model.decode(run))
        return "".join(parts)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """The text of these pieces, decoded as their ids are."""
        return self._decode(self.convert_tokens_to_ids(tokens))
