"""Generation for the EX stages: prompts in, answer texts out (batching by length, stopping, greedy or sampled).

Two decoders give the same greedy answers for the same batch (a test checks it on CPU):
- "prune" (default): one prefill of the left-padded batch, then a token at a time; an answer that has ended
  leaves the batch (its rows of the key/value cache are dropped), so one long answer no longer makes the whole
  batch pay for every step until the token cap;
- "hf": one `model.generate` call per batch (transformers' loop: every row decodes until the last one ends);
  `generate_kwargs` reach it, e.g. cache_implementation="static" for a compiled static cache.
An answer ends at a stop token (eos, the template's end of turn) or, in the plain format, at a stop string
(scripts/prompts.py: PLAIN_STOPS), where it is cut. On CUDA out-of-memory a batch is split in halves.
The pruned decoder writes each step's keys and values into room made after the prefill (RoomyLayer), where
transformers' cache concatenates the whole layer anew at every step.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

from scripts.gpu_memory import split_on_oom
from scripts.models import keep_last_logits
from scripts.prompts import end_of_turn, stop_strings

DECODERS = ("prune", "hf")


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: `n` answers per prompt at this temperature and top-p, seeded per batch."""

    n: int = 8
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: eos plus the chat template's end-of-turn token when it is one token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
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


def make_room(cache, room: int) -> None:
    """Gives each full-attention layer of a prefilled DynamicCache room for `room` more positions (others as they are)."""
    for i, layer in enumerate(getattr(cache, "layers", [])):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            cache.layers[i] = RoomyLayer(layer, room)


def length_sorted_batches(prompts: Sequence[str], tokenizer, batch_size: int) -> list[list[int]]:
    """Indices of the prompts grouped into batches of similar token length (longest first)."""
    if not prompts:  # every answer already stored (a resumed run), or a process of a launch with no share
        return []
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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
    batch_size: int = 16,
    max_new_tokens: int = 160,
    done: Callable[[list[int], list, float], None] | None = None,
    skip: Iterable[int] = (),
    sampling: Sampling | None = None,
    decoder: str = "prune",
    roomy_cache: bool = True,
    **generate_kwargs,
) -> list:
    """Answers for the prompts (greedy, or with `sampling` a list of n per prompt); `done(indices, answers, seconds)`
    after each batch. Prompts in `skip` are left as None; roomy_cache=False keeps transformers' concatenating cache
    in the pruned decoder (the benchmarks' reference)."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {DECODERS}")
    tokenizer.padding_side = "left"
    skip = set(skip)
    todo = [i for i in range(len(prompts)) if i not in skip]
    outputs: list = [None] * len(prompts)
    eos, stops = stop_token_ids(tokenizer), stop_strings(tokenizer)
    batches = length_sorted_batches([prompts[i] for i in todo], tokenizer, batch_size)
    for batch in tqdm(batches, desc="generating SQL", unit="batch"):
        indices = [todo[i] for i in batch]
        start = time.perf_counter()

        def run(part: list[int]) -> list:
            texts = [prompts[i] for i in part]
            if sampling:  # seeded by the batch's first prompt, so a resumed run samples the same answers
                torch.manual_seed(sampling.seed * 1_000_003 + part[0])
            if decoder == "hf":
                return _generate_hf(model, tokenizer, texts, max_new_tokens, eos, stops, sampling, **generate_kwargs)
            return _generate_pruned(model, tokenizer, texts, max_new_tokens, eos, stops, sampling, roomy_cache)

        answers = split_on_oom(run, indices, "answers")
        for i, answer in zip(indices, answers):
            outputs[i] = answer
        if done:
            done(indices, answers, time.perf_counter() - start)
    return outputs


def _group(texts: list[str], n: int | None) -> list:
    """Texts as they are (greedy), or in consecutive groups of n (n samples per prompt)."""
    return texts if n is None else [texts[i : i + n] for i in range(0, len(texts), n)]


@torch.inference_mode()
def _generate_hf(model, tokenizer, prompts: list[str], max_new_tokens: int, eos: list[int], stops: Sequence[str],
                 sampling: Sampling | None, **generate_kwargs) -> list:
    """Answers of one left-padded `model.generate` call, each cut at its first stop string."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    prompt_length = enc["input_ids"].shape[1]
    if stops:
        generate_kwargs["stopping_criteria"] = StoppingCriteriaList(
            [StopAtText(tokenizer, stops, prompt_length), *generate_kwargs.get("stopping_criteria", [])])
    if sampling:
        generate_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                               num_return_sequences=sampling.n)
    else:
        generate_kwargs.update(do_sample=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    texts = tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
    return _group([cut_at_stop(text, stops) for text in texts], sampling and sampling.n)


@torch.inference_mode()
def _generate_pruned(model, tokenizer, prompts: list[str], max_new_tokens: int, eos: list[int],
                     stops: Sequence[str], sampling: Sampling | None, roomy_cache: bool = True) -> list:
    """Answers of one left-padded batch, decoded a token at a time; an ended answer leaves the batch."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if sampling:  # n rows per prompt, next to each other (as num_return_sequences orders them)
        ids, mask = ids.repeat_interleave(sampling.n, 0), mask.repeat_interleave(sampling.n, 0)
    rows = ids.shape[0]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    last_only = keep_last_logits(model, 1)  # the prefill's logits at the last position only, as generate does
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    cache = out.past_key_values  # the model's own cache class (sliding-window layers where it has them)
    if roomy_cache:
        make_room(cache, max_new_tokens)
    alive = torch.arange(rows, device=ids.device)  # the original row of each row still in the batch
    tokens = torch.empty(rows, 0, dtype=torch.long, device=ids.device)  # new tokens of the rows still in the batch
    answers: list[list[int]] = [[] for _ in range(rows)]
    stop_ids = torch.tensor(eos, device=ids.device)
    stop_text = StopAtText(tokenizer, stops, 0) if stops else None
    last = positions[:, -1]
    for step in range(max_new_tokens):
        chosen = _next_tokens(out.logits[:, -1], sampling)
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        ended = torch.isin(chosen, stop_ids)
        if stop_text is not None:
            ended |= stop_text(tokens, None)
        if ended.any() or step == max_new_tokens - 1:
            for row, original in enumerate(alive.tolist()):
                if ended[row] or step == max_new_tokens - 1:
                    answers[original] = tokens[row].tolist()
        keep = (~ended).nonzero().flatten()
        if step == max_new_tokens - 1 or keep.numel() == 0:
            break
        if keep.numel() < alive.numel():
            cache.batch_select_indices(keep)
            alive, tokens, mask, last, chosen = alive[keep], tokens[keep], mask[keep], last[keep], chosen[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last = last + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=last[:, None],
                    past_key_values=cache, use_cache=True, **last_only)
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return _group([cut_at_stop(text, stops) for text in texts], sampling and sampling.n)


def _next_tokens(logits: torch.Tensor, sampling: Sampling | None) -> torch.Tensor:
    """The next token of each row: the most likely (greedy), or drawn with temperature and top-p."""
    logits = logits.float()
    if sampling is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # keep the smallest set reaching top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    picked = torch.multinomial(sorted_probs, 1)
    return order.gather(-1, picked).flatten()
