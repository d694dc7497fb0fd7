"""Generation for the EX stages: prompts in, answer texts out (batching by length, stopping, greedy or sampled).

Three decoders give the same greedy answers for the same batch (a test checks it on CPU):
- "prune": one prefill of the left-padded batch, then a token at a time; an answer that has ended
  leaves the batch (its rows of the key/value cache are dropped), so one long answer no longer makes the whole
  batch pay for every step until the token cap;
- "graph" (default): the same loop over static caches (StaticStep): a step of a power-of-two number of rows is captured
  once as a CUDA graph and replayed, and a batch moves to the step half its size once its rows fit there;
  models whose cache has other than full-attention layers (sliding windows) decode as "prune" does;
- "hf": one `model.generate` call per batch (transformers' loop: every row decodes until the last one ends);
  `generate_kwargs` reach it, e.g. cache_implementation="static" for a compiled static cache.
An answer ends at a stop token (the tokenizer's and the generation config's eos, the template's end of turn) or, in
the plain format, at a stop string (scripts/prompts.py: PLAIN_STOPS), where it is cut. On CUDA out-of-memory a
batch is split in halves. Every decoder applies the same logits processing: none for greedy answers (the argmax
of the model's logits; a generation config's penalties are not applied), temperature and top-p for sampled ones,
each row drawn from its own seed (the prompt, the candidate's number and Sampling.seed), so a prompt's candidates
do not depend on the batch it is in, nor on the decoder.
The pruned decoder writes each step's keys and values into room made after the prefill (RoomyLayer), where
transformers' cache concatenates the whole layer anew at every step.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from scripts.auto_batch import AUTO, auto_batch, sorted_batches
from scripts.gpu_memory import is_out_of_memory, release_memory, split_on_oom
from scripts.models import keep_last_logits
from scripts.prompts import end_of_turn, stop_strings

log = logging.getLogger(__name__)

DECODERS = ("prune", "graph", "hf")
SAMPLE_TOP_K = 256  # sampled tokens are sought among this many likeliest first (see sample_tokens)
MASKED_ATTENTIONS = ("sdpa", "eager")  # attentions that read a static step's 4-D mask as it is meant


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: `n` answers per prompt at this temperature and top-p, each seeded by its prompt and number."""

    n: int = 8
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos, the model's generation config's eos ids, and the chat
    template's end-of-turn token when it is one token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([configured] if isinstance(configured, int) else configured or [])
    marker = end_of_turn(tokenizer).strip()
    if marker:
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(marker_ids) == 1:
            ids.add(marker_ids[0])
    return sorted(ids)


class RoomyLayer(DynamicLayer):
    """A full-attention cache layer with room for `room` more positions: a step writes its keys and values in place
    (transformers' DynamicLayer concatenates the whole layer anew at every step)."""

    def __init__(self, layer: DynamicLayer, room: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = layer.dtype, layer.device, True
        self.length = layer.keys.shape[-2]
        self.key_room = _with_room(layer.keys, room)
        self.value_room = _with_room(layer.values, room)
        self._expose()

    def _expose(self) -> None:
        """Point keys and values at the filled part of the room."""
        self.keys, self.values = self.key_room[..., : self.length, :], self.value_room[..., : self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new positions after the filled ones; the filled keys and values."""
        new = key_states.shape[-2]
        if self.length + new > self.key_room.shape[-2]:
            raise RuntimeError(f"RoomyLayer is full: {self.length} + {new} > {self.key_room.shape[-2]} positions")
        self.key_room[..., self.length : self.length + new, :] = key_states
        self.value_room[..., self.length : self.length + new, :] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only these rows of the batch."""
        self.key_room, self.value_room = self.key_room[indices], self.value_room[indices]
        self._expose()


def _with_room(states: torch.Tensor, room: int) -> torch.Tensor:
    """`states` copied into a tensor `room` positions longer along the sequence (the rest left unset)."""
    batch, heads, length, dim = states.shape
    roomy = states.new_empty(batch, heads, length + room, dim)
    roomy[..., :length, :] = states
    return roomy


def _full_attention(layer) -> bool:
    """Whether a cache layer is a filled, plain full-attention DynamicLayer (not a sliding-window or other kind)."""
    return type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4


def make_room(cache, room: int) -> None:
    """Gives each full-attention layer of a prefilled DynamicCache room for `room` more positions (others as they are)."""
    for i, layer in enumerate(getattr(cache, "layers", [])):
        if _full_attention(layer):
            cache.layers[i] = RoomyLayer(layer, room)


def attention_implementation(model) -> str | None:
    """The attention the model was loaded with ("sdpa", "eager", "flash_attention_2", ...)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _static_view(layer: StaticLayer, rows: int) -> StaticLayer:
    """A StaticLayer over the first `rows` rows of another one's keys and values."""
    view = StaticLayer(max_cache_len=layer.max_cache_len)
    view.dtype, view.device, view.num_heads = layer.dtype, layer.device, layer.num_heads
    view.k_head_dim, view.v_head_dim, view.batch_size = layer.k_head_dim, layer.v_head_dim, rows
    view.keys, view.values = layer.keys[:rows], layer.values[:rows]
    view.cumulative_length = layer.cumulative_length.clone()
    view.is_initialized = True
    return view


def _gather_rows(source: torch.Tensor, rows: torch.Tensor, target: torch.Tensor, chunk: int = 64) -> None:
    """target[:len(rows)] = source[rows], chunk by chunk: safe when target is the first rows of source's memory,
    since ascending rows never read a row an earlier chunk has written (rows[i] >= i)."""
    for start in range(0, rows.numel(), chunk):
        part = rows[start : start + chunk]
        target[start : start + part.numel()] = source[part]


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, n - 1).bit_length()


class StaticStep:
    """One decoding step of `rows` rows over static caches of `length` positions (transformers' StaticLayer): its
    inputs sit in fixed buffers, so on a GPU the whole step is captured once as a CUDA graph and each later step is
    one replay, where an eager step launches every kernel of every layer from Python. The mask hides the cache's
    padding and the positions not yet written; elsewhere than on a GPU the step runs eagerly on the same buffers."""

    def __init__(self, model, rows: int, length: int, like: Sequence, capture: bool = True,
                 base: StaticStep | None = None, pool=None):
        keys = like[0].keys
        self.model, self.rows, self.length = model, rows, length
        self.additive = attention_implementation(model) == "eager"  # eager attention adds the mask to its scores
        self.dtype = keys.dtype
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=keys.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=keys.device)  # of the token fed next
        self.slot = torch.zeros(1, dtype=torch.long, device=keys.device)  # the cache position it is written at
        self.mask = torch.zeros(rows, length, dtype=torch.bool, device=keys.device)
        if base is None:
            self.layers = [StaticLayer(max_cache_len=length) for _ in like]
            for layer, other in zip(self.layers, like):
                layer.lazy_initialization(other.keys[:1, :, :1].expand(rows, -1, -1, -1),
                                          other.values[:1, :, :1].expand(rows, -1, -1, -1))
        else:  # the first rows of a larger step's caches: a batch's steps hold its keys and values once
            self.layers = [_static_view(layer, rows) for layer in base.layers]
        self.cache = Cache(layers=self.layers)
        self.last_only = keep_last_logits(model, 1)
        self.graph, self.logits = None, None
        if capture and keys.device.type == "cuda":
            self._capture(pool)

    def _forward(self) -> torch.Tensor:
        """The step itself: the slot unmasked, the model run, slot and positions moved on; the last logits."""
        self.mask.index_fill_(1, self.slot, True)
        mask = self.mask[:, None, None, :]
        if self.additive:  # 0 where a row attends, the dtype's minimum where it must not
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(self.dtype).min)
        out = self.model(input_ids=self.ids, attention_mask=mask,
                         position_ids=self.positions[:, None], past_key_values=self.cache, use_cache=True,
                         **self.last_only)
        self.slot += 1
        self.positions += 1
        return out.logits[:, -1]

    def _capture(self, pool=None) -> None:
        """Capture the step as a CUDA graph (in `pool`, shared by the steps of one cache length), after one run
        outside it (kernels chosen, workspaces made). That run writes keys and values at the cache's last position,
        which no step reads before writing it (a larger step's rows may sit in these caches), and junk elsewhere
        that `load` or `take` overwrites."""
        for layer in self.layers:
            layer.cumulative_length.fill_(self.length - 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.logits = self._forward()
        self.graph = graph

    def _reset_rows(self, n: int) -> None:
        """Rows from n on pad the step: each attends to its first position only (never an empty softmax), at
        position 0."""
        self.mask[n:] = False
        self.mask[n:, 0] = True
        self.positions[n:] = 0

    def load(self, prefill: Sequence, mask: torch.Tensor, positions: torch.Tensor, repeat: int = 1) -> None:
        """Take a prefilled batch: its cache layers (each prompt's rows `repeat` times over, next to each other),
        2-D attention mask and positions (of every row)."""
        n, length = mask.shape
        for layer, filled in zip(self.layers, prefill):
            for mine, theirs in ((layer.keys, filled.keys), (layer.values, filled.values)):
                mine[:n, :, :length].unflatten(0, (-1, repeat)).copy_(theirs[:, None])
            layer.cumulative_length.fill_(length)
        self.mask[:n, :length] = mask.bool()
        self.mask[:n, length:] = False
        self._reset_rows(n)
        self.slot.fill_(length)
        self.positions[:n] = positions[:, -1] + 1

    def take(self, other: StaticStep, rows: torch.Tensor) -> None:
        """Take these rows (ascending) of a larger step, mid-answer, also when its caches hold this step's."""
        n = rows.numel()
        for mine, theirs in zip(self.layers, other.layers):
            _gather_rows(theirs.keys, rows, mine.keys)
            _gather_rows(theirs.values, rows, mine.values)
            mine.cumulative_length.copy_(theirs.cumulative_length)
        torch.index_select(other.mask, 0, rows, out=self.mask[:n])
        self._reset_rows(n)
        self.slot.copy_(other.slot)
        self.positions[:n] = other.positions[rows]

    def __call__(self, rows: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The next logits of every row of the step, after feeding `chosen` to these rows."""
        self.ids[rows, 0] = chosen
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


class StepGraphs:
    """The static steps of one `generate` call, by rows (powers of two), for one cache length at a time: batches come
    longest first, so a length once left is not seen again, and its steps are freed."""

    LENGTH_STEP = 128  # cache lengths are rounded up to a multiple, so that batches of similar length share steps

    def __init__(self, model):
        self.model, self.length, self.steps, self.pool = model, 0, {}, None
        self.unfit_reported, self.capture = False, True

    def fits(self, cache) -> bool:
        """Whether every layer of a prefilled cache is a plain full-attention one (a static copy attends alike) and
        the model's attention takes the step's 4-D mask (sdpa: boolean, eager: additive)."""
        layers = getattr(cache, "layers", None)
        return (attention_implementation(self.model) in MASKED_ATTENTIONS and bool(layers)
                and all(_full_attention(layer) for layer in layers))

    def report_unfit(self, cache) -> None:
        """Say once that this model decodes eagerly (sliding-window or other cache layers, or its attention)."""
        if not self.unfit_reported:
            attention = attention_implementation(self.model)
            if attention not in MASKED_ATTENTIONS:
                log.info("static decoding steps need sdpa or eager attention; this model's is %s: eager steps",
                         attention)
            else:
                kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
                log.info("static decoding steps need full-attention cache layers; this model's are %s: eager steps",
                         ", ".join(kinds) or type(cache).__name__)
            self.unfit_reported = True

    def step(self, rows: int, length: int, like: Sequence) -> StaticStep:
        """The step for this many rows (rounded up to a power of two) and at least this cache length. Steps of one
        length share the largest one's caches (the smaller ones are views of its first rows) and a graph pool, so a
        batch holds its keys and values once; a batch larger than every kept step starts them anew."""
        length, rows = self._rounded(length), _power_of_two(rows)
        if not self._kept_for(rows, length):
            self.clear()
            self.length = length
        if rows not in self.steps:
            base = self.steps[max(self.steps)] if self.steps else None
            if self.pool is None and self.capture and like[0].keys.device.type == "cuda":
                self.pool = torch.cuda.graph_pool_handle()
            try:
                self.steps[rows] = StaticStep(self.model, rows, length, like, self.capture, base, self.pool)
            except Exception as error:  # noqa: BLE001 - a model whose step cannot be a graph decodes eagerly
                if not self.capture or is_out_of_memory(error):
                    raise
                log.warning("this model's decoding step cannot be captured as a CUDA graph (%s: %s); its steps run "
                            "eagerly", type(error).__name__, str(error).splitlines()[0] if str(error) else "")
                self.capture = False
                self.steps[rows] = StaticStep(self.model, rows, length, like, False, base)
        return self.steps[rows]

    def _rounded(self, length: int) -> int:
        """A cache length rounded up to a multiple of LENGTH_STEP."""
        return -(-length // self.LENGTH_STEP) * self.LENGTH_STEP

    def _kept_for(self, rows: int, length: int) -> bool:
        """Whether the kept steps serve a batch of `rows` (a power of two) and this rounded cache length."""
        return length == self.length and rows <= max(self.steps, default=rows)

    def make_way(self, rows: int, length: int) -> None:
        """Free the kept steps before a batch of this many rows and cache length that would not use them (step()
        would free them after its prefill), so that its prefill has their memory."""
        if self.steps and not self._kept_for(_power_of_two(rows), self._rounded(length)):
            self.clear()

    def clear(self) -> None:
        """Free every step (its caches, graph and pool)."""
        self.steps.clear()
        self.length, self.pool = 0, None


class _GraphedSteps:
    """Decoding steps of one batch through StepGraphs: in the smallest step that holds its rows; once its rows fit a
    step half the size, they move there (a row that ended before decodes on, unread, until then)."""

    def __init__(self, graphs: StepGraphs, cache, mask: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
                 repeat: int = 1):
        self.graphs, self.length = graphs, mask.shape[1] + max_new_tokens
        self.step = graphs.step(mask.shape[0], self.length, cache.layers)
        self.step.load(cache.layers, mask, positions, repeat)
        self.rows = torch.arange(mask.shape[0], device=mask.device)  # the step's row of each row still in the batch

    def drop(self, keep: torch.Tensor) -> None:
        """Keep only these rows."""
        self.rows = self.rows[keep]
        if _power_of_two(self.rows.numel()) < self.step.rows:
            smaller = self.graphs.step(self.rows.numel(), self.length, self.step.layers)
            smaller.take(self.step, self.rows)
            self.step, self.rows = smaller, torch.arange(self.rows.numel(), device=self.rows.device)

    def __call__(self, chosen: torch.Tensor) -> torch.Tensor:
        """The next logits of each row, after feeding it `chosen`."""
        return self.step(self.rows, chosen)[self.rows]


def token_lengths(prompts: Sequence[str], tokenizer) -> list[int]:
    """The token length of each prompt, as a batch's prefill encodes it."""
    if not prompts:  # every answer already stored (a resumed run), or a process of a launch with no share
        return []
    return [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def length_sorted_batches(prompts: Sequence[str], tokenizer, batch_size: int) -> list[list[int]]:
    """Indices of the prompts grouped into batches of similar token length (longest first)."""
    return sorted_batches(range(len(prompts)), token_lengths(prompts, tokenizer), batch_size)


class StopAtText(StoppingCriteria):
    """Ends each answer once its new text holds one of `stops` after some content (the plain format's boundaries)."""

    WINDOW = 16  # new tokens decoded per step: a stop string is a few characters, a token at least one

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, tuple(stops), prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_length:]
        tails = self.tokenizer.batch_decode(new[:, -self.WINDOW:], skip_special_tokens=True)
        hits = [i for i, tail in enumerate(tails) if any(stop in tail for stop in self.stops)]
        done = torch.zeros(len(tails), dtype=torch.bool, device=input_ids.device)
        for i in hits:  # rare: confirm on the whole answer that some content comes before the stop
            text = self.tokenizer.decode(new[i], skip_special_tokens=True)
            done[i] = first_stop(text, self.stops) is not None
        return done


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of `stops` begins after the answer's first non-blank character, or None."""
    content = len(text) - len(text.lstrip())
    found = [i for i in (text.find(stop, content + 1) for stop in stops) if i != -1]
    return min(found) if found else None


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The answer up to its first stop string, trailing blanks dropped (the whole text when none follows content)."""
    at = first_stop(text, stops) if stops else None
    return text if at is None else text[:at].rstrip()


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int | str = 16,
    max_new_tokens: int = 160,
    done: Callable[[list[int], list, float], None] | None = None,
    skip: Iterable[int] = (),
    sampling: Sampling | None = None,
    decoder: str = "graph",
    roomy_cache: bool = True,
    **generate_kwargs,
) -> list:
    """Answers for the prompts (greedy, or with `sampling` a list of n per prompt); `done(indices, answers, seconds)`
    after each batch. batch_size="auto" sizes each batch to the GPU memory free now (scripts/auto_batch.py). Prompts
    in `skip` are left as None; roomy_cache=False keeps transformers' concatenating cache in the pruned decoder (the
    benchmarks' reference); `generate_kwargs` go to `model.generate` (decoder "hf" only)."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {DECODERS}")
    if generate_kwargs and decoder != "hf":
        raise TypeError(f"{', '.join(sorted(generate_kwargs))}: model.generate arguments, taken by decoder 'hf' only")
    tokenizer.padding_side = "left"
    skip = set(skip)
    todo = [i for i in range(len(prompts)) if i not in skip]
    outputs: list = [None] * len(prompts)
    eos, stops = stop_token_ids(tokenizer, model), stop_strings(tokenizer)
    lengths = token_lengths([prompts[i] for i in todo], tokenizer)
    length_of, repeat = dict(zip(todo, lengths)), sampling.n if sampling else 1
    batches, planned = _batches(model, lengths, batch_size, max_new_tokens, repeat, decoder)
    graphs = StepGraphs(model) if decoder == "graph" else None
    share = Fraction(1)  # of a batch's planned size per part; after a split, later ones start at the share that fitted
    for batch, size in tqdm(zip(batches, planned), total=len(batches), desc="generating SQL", unit="batch"):
        indices = [todo[i] for i in batch]
        start = time.perf_counter()
        limit = max(1, int(size * share))  # prompts per part
        fitted: list[int] = []  # sizes of this batch's parts that ran

        def run(part: list[int]) -> list:
            texts = [prompts[i] for i in part]

            def attempt() -> list:
                if decoder == "hf":
                    return _generate_hf(model, tokenizer, texts, max_new_tokens, eos, stops, sampling,
                                        **generate_kwargs)
                if graphs is not None:
                    graphs.make_way(len(part) * repeat, max(length_of[i] for i in part) + max_new_tokens)
                return _generate_pruned(model, tokenizer, texts, max_new_tokens, eos, stops, sampling, roomy_cache,
                                        graphs)

            try:
                answers = attempt()
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are retried, the rest re-raised
                if graphs is None or not graphs.steps or not is_out_of_memory(error):
                    raise
                answers = None
            if answers is None:
                graphs.clear()  # the steps kept for later batches hold memory this batch may need
                release_memory()
                log.info("out of GPU memory beside the static steps kept for later batches; freed, decoding again")
                answers = attempt()  # out of memory again: split_on_oom splits the batch
            fitted.append(len(part))
            return answers

        answers = [a for i in range(0, len(indices), limit)
                   for a in split_on_oom(run, indices[i : i + limit], "answers")]
        if max(fitted) < min(limit, len(indices)):  # split: the size that fitted is remembered, as a share
            share = Fraction(max(fitted), size)
            if batch_size == AUTO:
                log.info("generating in parts of %s of each estimated batch size from now on (the share that fitted)",
                         share)
            else:
                log.info("generating in parts of %d prompts from now on (the size that fitted)", max(fitted))
        for i, answer in zip(indices, answers):
            outputs[i] = answer
        if done:
            done(indices, answers, time.perf_counter() - start)
    return outputs


def _batches(model, lengths: list[int], batch_size: int | str, max_new_tokens: int, repeat: int,
             decoder: str) -> tuple[list[list[int]], list[int]]:
    """The batches (positions in `lengths`, longest first) and each one's planned size: batch_size, or with "auto"
    the most prompts that fit at the batch's longest length (said once in the log)."""
    if batch_size != AUTO:
        batches = sorted_batches(range(len(lengths)), lengths, batch_size)
        return batches, [batch_size] * len(batches)
    if not lengths:
        return [], []
    auto = auto_batch(model, max_new_tokens, repeat, static=decoder == "graph")
    batches = sorted_batches(range(len(lengths)), lengths, auto.prompts_at)
    auto.log_choice(max(lengths), min(lengths), len(lengths))
    return batches, [auto.prompts_at(lengths[batch[0]]) for batch in batches]


def _group(texts: list[str], n: int | None) -> list:
    """Texts as they are (greedy), or in consecutive groups of n (n samples per prompt)."""
    return texts if n is None else [texts[i : i + n] for i in range(0, len(texts), n)]


@torch.inference_mode()
def _generate_hf(model, tokenizer, prompts: list[str], max_new_tokens: int, eos: list[int], stops: Sequence[str],
                 sampling: Sampling | None, **generate_kwargs) -> list:
    """Answers of one left-padded `model.generate` call, each cut at its first stop string: greedy over the model's
    logits, the row sampler choosing each sampled token (the same draws as the other decoders)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    prompt_length = enc["input_ids"].shape[1]
    if stops:
        generate_kwargs["stopping_criteria"] = StoppingCriteriaList(
            [StopAtText(tokenizer, stops, prompt_length), *generate_kwargs.get("stopping_criteria", [])])
    inputs = dict(enc)
    if sampling:  # n rows per prompt, next to each other, each drawing its own tokens
        inputs = {k: v.repeat_interleave(sampling.n, 0) for k, v in inputs.items()}
        generate_kwargs["logits_processor"] = LogitsProcessorList(
            [RowSampler(sampling, row_seeds(prompts, sampling).to(model.device), prompt_length),
             *generate_kwargs.get("logits_processor", [])])
    with _plain_generation_config(model):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=eos, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    texts = tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
    return _group([cut_at_stop(text, stops) for text in texts], sampling and sampling.n)


@contextmanager
def _plain_generation_config(model) -> Iterator[None]:
    """While `model.generate` runs: a generation config with the model's special tokens only, so that none of its
    penalties or sampling settings (e.g. a repetition penalty) changes the logits the other decoders see."""
    get_base = getattr(model, "get_base_model", None)  # a PEFT model generates through its base model
    base = get_base() if callable(get_base) else model
    saved = base.generation_config
    base.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id,
                                              pad_token_id=saved.pad_token_id)
    try:
        yield
    finally:
        base.generation_config = saved


class RowSampler(LogitsProcessor):
    """`model.generate`'s scores replaced by the row sampler's choice (greedy decoding then takes it)."""

    def __init__(self, sampling: Sampling, seeds: torch.Tensor, prompt_length: int):
        self.sampling, self.seeds, self.prompt_length = sampling, seeds, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = sample_tokens(scores, self.sampling, self.seeds, input_ids.shape[1] - self.prompt_length)
        return torch.full_like(scores, -float("inf")).scatter_(1, chosen[:, None], 0.0)


def _prefill(model, tokenizer, prompts: list[str]):
    """The prefill of one left-padded batch, one row per prompt: (its output, mask, positions)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    last_only = keep_last_logits(model, 1)  # the prefill's logits at the last position only, as generate does
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    return out, mask, positions


class _EagerSteps:
    """Decoding steps through the model's own cache (roomy or concatenating): the rows that leave are dropped."""

    def __init__(self, model, cache, mask: torch.Tensor, positions: torch.Tensor):
        self.model, self.cache, self.mask, self.last = model, cache, mask, positions[:, -1]
        self.last_only = keep_last_logits(model, 1)

    def drop(self, keep: torch.Tensor) -> None:
        """Keep only these rows."""
        self.cache.batch_select_indices(keep)
        self.mask, self.last = self.mask[keep], self.last[keep]

    def __call__(self, chosen: torch.Tensor) -> torch.Tensor:
        """The next logits of each row, after feeding it `chosen`."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.last = self.last + 1
        out = self.model(input_ids=chosen[:, None], attention_mask=self.mask, position_ids=self.last[:, None],
                         past_key_values=self.cache, use_cache=True, **self.last_only)
        return out.logits[:, -1]


@torch.inference_mode()
def _generate_pruned(model, tokenizer, prompts: list[str], max_new_tokens: int, eos: list[int],
                     stops: Sequence[str], sampling: Sampling | None, roomy_cache: bool = True,
                     graphs: StepGraphs | None = None) -> list:
    """Answers of one left-padded batch, decoded a token at a time; an ended answer leaves the batch. With
    `graphs`, steps run over static caches (CUDA graphs on a GPU) where the model's cache allows it."""
    out, mask, positions = _prefill(model, tokenizer, prompts)
    cache, first = out.past_key_values, out.logits[:, -1]  # the model's own cache class
    del out
    repeat = sampling.n if sampling else 1  # each prompt is prefilled once; its n candidates decode from its cache
    if repeat > 1:
        first, mask, positions = (t.repeat_interleave(repeat, 0) for t in (first, mask, positions))
    if graphs is not None and graphs.fits(cache):
        steps = _GraphedSteps(graphs, cache, mask, positions, max_new_tokens, repeat)
        del cache  # its static copy holds the keys and values now
    else:
        if graphs is not None:
            graphs.report_unfit(cache)
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)
        if roomy_cache:
            make_room(cache, max_new_tokens)
        steps = _EagerSteps(model, cache, mask, positions)
    seeds = row_seeds(prompts, sampling).to(first.device) if sampling else None
    answers = _decode(first, steps, tokenizer, max_new_tokens, eos, stops, sampling, seeds)
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return _group([cut_at_stop(text, stops) for text in texts], sampling and sampling.n)


def _decode(logits: torch.Tensor, steps, tokenizer, max_new_tokens: int, eos: list[int], stops: Sequence[str],
            sampling: Sampling | None, seeds: torch.Tensor | None = None) -> list[list[int]]:
    """The new tokens of each row, from the prefill's last logits: a token at a time, ended rows dropped; sampled
    rows draw from their `seeds`."""
    rows, device = logits.shape[0], logits.device
    alive = torch.arange(rows, device=device)  # the original row of each row still in the batch
    tokens = torch.empty(rows, 0, dtype=torch.long, device=device)  # new tokens of the rows still in the batch
    answers: list[list[int]] = [[] for _ in range(rows)]
    stop_ids = torch.tensor(eos, device=device)
    stop_text = StopAtText(tokenizer, stops, 0) if stops else None
    for step in range(max_new_tokens):
        chosen = logits.argmax(dim=-1) if sampling is None else sample_tokens(logits, sampling, seeds[alive], step)
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        ended = torch.isin(chosen, stop_ids)
        if stop_text is not None:
            ended |= stop_text(tokens, None)
        final = step == max_new_tokens - 1
        if final or ended.any():
            for row, original in enumerate(alive.tolist()):
                if final or ended[row]:
                    answers[original] = tokens[row].tolist()
        keep = (~ended).nonzero().flatten()
        if final or keep.numel() == 0:
            break
        if keep.numel() < alive.numel():
            steps.drop(keep)
            alive, tokens, chosen = alive[keep], tokens[keep], chosen[keep]
        logits = steps(chosen)
    return answers


def row_seeds(prompts: Sequence[str], sampling: Sampling) -> torch.Tensor:
    """The seed of each sampled row, n per prompt in order: from the prompt's text, the candidate's number and
    Sampling.seed alone, so a candidate is the same in any batch (and in a resumed run)."""
    seeds = []
    for prompt in prompts:
        for j in range(sampling.n):
            digest = hashlib.blake2b(f"{sampling.seed}\0{j}\0{prompt}".encode(), digest_size=8).digest()
            seeds.append(int.from_bytes(digest, "little", signed=True))
    return torch.tensor(seeds, dtype=torch.long)


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 that has its bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64 values (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One number in [0, 1) per row from its seed and the step (splitmix64; int64 arithmetic wraps)."""
    x = seeds + _int64((step + 1) * _GOLDEN % (1 << 64))
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return _shift_right(x, 11).double() / float(1 << 53)


def sample_tokens(logits: torch.Tensor, sampling: Sampling, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row, drawn with temperature and top-p by the row's own uniform number at this step. The
    nucleus is sought among the SAMPLE_TOP_K likeliest tokens (exact when they hold more than top_p); only rows
    whose nucleus is wider sort the whole vocabulary."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    u = uniform(seeds, step).to(probs.device)
    top, order = probs.topk(min(SAMPLE_TOP_K, probs.shape[-1]), dim=-1)
    chosen = _nucleus_pick(top, order, u, sampling.top_p)
    wide = (top.sum(-1) <= sampling.top_p).nonzero().flatten()
    if wide.numel():
        everything, every_order = probs[wide].sort(dim=-1, descending=True)
        chosen[wide] = _nucleus_pick(everything, every_order, u[wide], sampling.top_p)
    return chosen


def _nucleus_pick(sorted_probs: torch.Tensor, order: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """The token of each row at its uniform number `u` along the smallest sorted prefix that reaches top_p."""
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
    cumulative = sorted_probs.masked_fill(outside, 0.0).cumsum(-1)
    target = u.to(cumulative.dtype) * cumulative[:, -1]
    picked = torch.searchsorted(cumulative, target[:, None], right=True).clamp(max=cumulative.shape[-1] - 1)
    return order.gather(-1, picked).flatten()
