"""EVAL_BATCH_SIZE=auto: per batch, the most prompts that fit the GPU memory free when the stage began.

A batch of n prompts left-padded to `length` tokens, each decoding `candidates` rows of up to `new_tokens` tokens
(rows = n x candidates), is estimated to take the larger of its two phases:

  prefill   n x length x kv                                    the prefill's key/value cache
          + n x length x (3 x intermediate + 4 x hidden) x dtype bytes    the MLP's and hidden states of one layer
          + n x attention(length)              eager: heads x length^2 x (dtype bytes + 4); else the mask, length^2
  decoding  n x length x kv                                    the prefill's cache, still held while it is copied
          + rows x (length + new_tokens) x kv  the decoding cache (none for MMLU's single forward); for the graph
                                               decoder, rows up to a power of two and positions up to a multiple of
                                               128, as its static caches are
          + rows x vocab x 8                   the last position's logits and their float32 softmax

with kv = layers x kv heads x head dim x 2 (keys and values) x dtype bytes, read from the model's config. For
Qwen2.5-Coder-0.5B voting over 1024 prompts of up to 919 tokens (8,192 rows) that is 128 GiB; that batch's measured
peak was 123 GiB with the weights (docs/RESULTS.md, section 25). A batch may take (1 - HEADROOM) of the memory free
when the stage began (the device's free memory, what torch's allocator holds unused, within the per-process cap),
and at most MAX_PROMPTS prompts and MAX_ROWS rows. Off the GPU, or for a config without layer sizes, auto is a fixed
size. Importing this module loads no torch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

AUTO = "auto"
FIXED_SIZE = 16  # prompts per batch for auto off the GPU (main.py's default)
MAX_PROMPTS = 1024  # the largest batch measured on one H200 (docs/RESULTS.md, sections 23 and 25)
MAX_ROWS = 2048  # voting: 256 prompts x 8 candidates took 49.8 s there, 1024 x 8 took 60.3 s (section 25)
HEADROOM = 0.15  # of the free memory, left for workspaces, CUDA graph pools and fragmentation
LENGTH_STEP = 128  # the graph decoder's cache lengths are multiples of it (scripts/generation.py: StepGraphs)
GIB = 1024 ** 3


@dataclass(frozen=True)
class ModelShape:
    """What one token costs a model in memory: the sizes its config gives, and the bytes of its compute dtype."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2

    @property
    def kv_bytes(self) -> int:
        """Bytes of one position's keys and values over every layer."""
        return self.layers * self.kv_heads * self.head_dim * 2 * self.dtype_bytes


def _first(config, *names: str) -> int | None:
    """The first of these config attributes that is a positive integer, or None."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _dtype_bytes(model) -> int:
    """Bytes of one value of the model's compute dtype (2 when it says none, or an integer one)."""
    dtype = getattr(model, "dtype", None)
    return dtype.itemsize if getattr(dtype, "is_floating_point", False) else 2


def model_shape(model) -> ModelShape | None:
    """The model's shape from its (text) config; None without layers, hidden size or attention heads."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head")
    if not (layers and hidden and heads):
        return None
    kv_heads = _first(text, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    kv_heads = kv_heads or (1 if getattr(text, "multi_query", False) else heads)
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    vocab = _first(text, "vocab_size") or getattr(embeddings, "num_embeddings", None) or 32_000
    return ModelShape(layers=layers, heads=heads, kv_heads=kv_heads,
                      head_dim=_first(text, "head_dim") or hidden // heads,
                      hidden=hidden, intermediate=_first(text, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
                      vocab=vocab, dtype_bytes=_dtype_bytes(model))


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, n - 1).bit_length()


def batch_bytes(shape: ModelShape, prompts: int, length: int, new_tokens: int = 0, candidates: int = 1,
                static: bool = False, eager: bool = False) -> int:
    """The estimated memory of one batch: the larger of its prefill and its decoding (the module's formula)."""
    return max(prefill_bytes(shape, prompts, length, eager),
               decoding_bytes(shape, prompts, length, new_tokens, candidates, static))


def prefill_bytes(shape: ModelShape, prompts: int, length: int, eager: bool = False) -> int:
    """The prefill's estimated memory: its cache, one layer's MLP and hidden states, and the attention's scores or
    mask."""
    hidden_states = prompts * length * (3 * shape.intermediate + 4 * shape.hidden) * shape.dtype_bytes
    attention = prompts * length ** 2 * (shape.heads * (shape.dtype_bytes + 4) if eager else 1)
    return prompts * length * shape.kv_bytes + hidden_states + attention


def decoding_bytes(shape: ModelShape, prompts: int, length: int, new_tokens: int = 0, candidates: int = 1,
                   static: bool = False) -> int:
    """The decoding's estimated memory: the prefill's cache, the decoding cache (static: at its rounded size) and
    the last logits of every row."""
    rows = prompts * candidates
    decoding_cache = 0
    if new_tokens:
        cache_rows, positions = rows, length + new_tokens
        if static:
            cache_rows, positions = _power_of_two(rows), -(-positions // LENGTH_STEP) * LENGTH_STEP
        decoding_cache = cache_rows * positions * shape.kv_bytes
    return prompts * length * shape.kv_bytes + decoding_cache + rows * shape.vocab * 8


@dataclass(frozen=True)
class AutoBatch:
    """Prompts per batch for one stage: from the batch's longest prompt and the memory free at the stage's start,
    or FIXED_SIZE when `budget` is None (`reason` says why)."""

    shape: ModelShape | None = None
    budget: int | None = None  # bytes a batch may take
    free: int | None = None  # the memory free at the start
    new_tokens: int = 0
    candidates: int = 1
    static: bool = False
    eager: bool = False
    reason: str = "on the CPU"

    def bytes_for(self, prompts: int, length: int) -> int:
        """The estimated memory of a batch of this many prompts of this padded length."""
        return batch_bytes(self.shape, prompts, length, self.new_tokens, self.candidates, self.static, self.eager)

    @property
    def most_prompts(self) -> int:
        """MAX_PROMPTS, or fewer where their rows would pass MAX_ROWS."""
        return max(1, min(MAX_PROMPTS, MAX_ROWS // self.candidates))

    def prompts_at(self, length: int) -> int:
        """The most prompts of this padded length whose batch fits the budget, in [1, MAX_PROMPTS], with at most
        MAX_ROWS rows."""
        if self.budget is None:
            return FIXED_SIZE
        low, high = 1, self.most_prompts
        while low < high:  # the estimate grows with the prompts: the largest that fits, by bisection
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.bytes_for(middle, length) <= self.budget else (low, middle - 1)
        return low

    def log_choice(self, longest: int, shortest: int, count: int, what: str = "prompts") -> None:
        """One line: the sizes chosen for the longest and the shortest prompts, and why."""
        most, least = (min(count, self.prompts_at(length)) for length in (shortest, longest))
        sizes = f"{least}" if least == most else f"{least}-{most}"
        if self.budget is None:
            log.info("EVAL_BATCH_SIZE auto: %s %s per batch (%s: a fixed size; set a number to choose)",
                     sizes, what, self.reason)
            return
        each = self.bytes_for(least, longest) / least
        log.info("EVAL_BATCH_SIZE auto: %s %s per batch (free %.1f GiB, ~%.2f GiB per %s of the longest, %d tokens; "
                 "at most %d)", sizes, what, self.free / GIB, each / GIB, what.rstrip("s"), longest, self.most_prompts)


def _cuda_device(model):
    """The model's CUDA device, or None when it runs elsewhere."""
    device = getattr(model, "device", None)
    return device if getattr(device, "type", None) == "cuda" else None


def auto_batch(model, new_tokens: int = 0, candidates: int = 1, static: bool = False) -> AutoBatch:
    """The AutoBatch of a stage about to run on `model` (its GPU's free memory read now)."""
    device = _cuda_device(model)
    if device is None:
        return AutoBatch()
    shape = model_shape(model)
    if shape is None:
        return AutoBatch(reason="the model's config gives no layer sizes")
    from scripts.gpu_memory import free_bytes

    free = free_bytes(device)
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return AutoBatch(shape=shape, budget=int(free * (1 - HEADROOM)), free=free, new_tokens=new_tokens,
                     candidates=max(1, candidates), static=static, eager=attention == "eager")


def sorted_batches(indices: Sequence[int], lengths: Sequence[int],
                   size: int | Callable[[int], int]) -> list[list[int]]:
    """The indices longest first (by lengths[i]), in batches of `size`, or of size(the batch's longest length)."""
    ordered = sorted(indices, key=lambda i: -lengths[i])
    batches, start = [], 0
    while start < len(ordered):
        count = max(1, size if isinstance(size, int) else size(lengths[ordered[start]]))
        batches.append(ordered[start : start + count])
        start += count
    return batches
