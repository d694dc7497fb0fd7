"""Letter log-likelihoods from a causal LM: batched forwards over token ids, a shared prefix's cache, a float32 head.

Every score is a float32 log-softmax over the vocabulary, whatever the model's dtype (`float32_head`); sequences
are left-padded, with position ids that count real tokens only.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from scripts.models import forward_parameters, keep_last_logits

log = logging.getLogger(__name__)


def score_single_token(model, contexts: list[list[int]], letter_ids: list[list[int]], tokenizer=None) -> list[list[float]]:
    """One forward per context: the log-probabilities of the 4 letter tokens at the last position."""
    import torch

    logprobs = _last_logprobs(model, contexts, keep=1, pad_id=_pad_id(tokenizer))[:, -1, :]
    index = torch.tensor(letter_ids, device=logprobs.device)
    return logprobs.gather(1, index).tolist()


def score_continuations(model, pairs: list[tuple[list[int], list[int]]], tokenizer=None) -> list[float]:
    """Summed log-probability of each continuation after its context (teacher forcing), one row per pair."""
    import torch

    sequences = [ctx + cont for ctx, cont in pairs]
    longest = max(len(cont) for _, cont in pairs)
    # left padding aligns every sequence at the right, so the last longest+1 positions cover every continuation
    logprobs = _last_logprobs(model, sequences, keep=longest + 1, pad_id=_pad_id(tokenizer))
    totals = []
    for row, (_, cont) in enumerate(pairs):
        n = len(cont)
        predicting = logprobs[row, -(n + 1): -1, :]  # position t predicts token t+1
        totals.append(predicting.gather(1, torch.tensor(cont, device=predicting.device)[:, None]).sum().item())
    return totals


def supports_prefix_cache(model) -> bool:
    """Whether the model's forward takes position_ids and a key/value cache (needed to start after a prefix)."""
    return {"position_ids", "past_key_values"} <= forward_parameters(model)


def prefix_cache(model, prefix: list[int]):
    """The key/value cache of one prompt prefix (a batch of one)."""
    import torch

    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, **keep_last_logits(model, 1))
    return out.past_key_values


def score_after_prefix(model, cache, prefix_length: int, suffixes: list[list[int]], letter_ids: list[list[int]],
                       tokenizer=None) -> list[list[float]]:
    """One forward per question over the tokens after a shared prefix whose cache is given: the 4 letters' log-probs.

    The suffixes are left-padded, so the padding sits between the prefix and each suffix; the attention mask
    hides it and the positions continue from the prefix, so every row sees exactly prefix + its own suffix.
    """
    import copy

    import torch

    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), _pad_id(tokenizer), dtype=torch.long)
    suffix_mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        ids[row, width - len(suffix):] = torch.tensor(suffix)
        suffix_mask[row, width - len(suffix):] = 1
    mask = torch.cat([torch.ones((len(suffixes), prefix_length), dtype=torch.long), suffix_mask], dim=1)
    positions = prefix_length + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        past = copy.deepcopy(cache)  # the forward appends to the cache it is given; the prefix's stays as it is
        past.batch_repeat_interleave(len(suffixes))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       past_key_values=past, use_cache=True, **keep_last_logits(model, 1)).logits[:, -1, :]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(1, torch.tensor(letter_ids, device=logprobs.device)).tolist()

@contextmanager
def float32_head(model) -> Iterator[None]:
    """Within it, the model's output head runs in float32 on the last hidden states, whatever the model's dtype.

    In bf16 the logits move in steps of 0.125 near the values MMLU letters get, so two letters often tie exactly
    and the first wins by default (docs/RESULTS.md, section 16). A forward hook replaces the head's output with
    hidden @ W.T in float32 (W dequantized when the head is 4-bit); the log-softmax normaliser is float32 too.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or hasattr(head, "base_layer"):  # e.g. a head wrapped by an adapter
        log.warning("MMLU: the output head is %s, not a plain linear layer; scoring with the model's own logits",
                    type(head).__name__)
        yield
        return
    weight = _dense_weight(head).float()
    bias = None if head.bias is None else head.bias.float()
    handle = head.register_forward_hook(
        lambda module, args, output: torch.nn.functional.linear(args[0].float(), weight, bias))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would round the products to 10 mantissa bits again
    try:
        yield
    finally:
        handle.remove()
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _dense_weight(head):
    """The head's weight as a dense tensor (a bitsandbytes 4-bit head is dequantized)."""
    weight = head.weight
    if weight.dtype.is_floating_point:
        return weight.detach()
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight.data, weight.quant_state)


def _last_logprobs(model, sequences: list[list[int]], keep: int, pad_id: int):
    """Float32 log-softmax over the vocabulary of the last `keep` positions of left-padded sequences."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    device = model.get_input_embeddings().weight.device
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "position_ids" in forward_parameters(model):  # positions count real tokens only: left padding shifts nothing
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    kwargs.update(keep_last_logits(model, keep))
    with torch.inference_mode():
        logits = model(**kwargs).logits[:, -keep:, :]
    return torch.log_softmax(logits.float(), dim=-1)


def _pad_id(tokenizer) -> int:
    """Any valid id for padding (masked out): pad, else eos, else 0."""
    if tokenizer is None:
        return 0
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


HARNESS_DEFAULT_LENGTH = 2048  # lm-evaluation-harness's HFLM._DEFAULT_MAX_LENGTH
_NO_LIMIT = 1e29  # tokenizers without a limit report int(1e30)


def context_size(model, tokenizer=None) -> int:
    """The model's context length as lm-evaluation-harness finds it: n_positions, max_position_embeddings or n_ctx
    of the (text) config, else the tokenizer's model_max_length when it sets one, else 2048."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (text_config, config):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(source, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        return limit
    return HARNESS_DEFAULT_LENGTH
