"""Stages 2 and 5: generate SQL for Spider dev questions, extract it from the model's text, score execution accuracy."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from custom_metrics.execution_accuracy import execution_accuracy
from scripts import distributed
from scripts.prompts import end_of_turn, render
from scripts.spider_data import SpiderLayout, schema_text
from scripts.sql_extraction import extract_sql
from scripts.store import Spool

log = logging.getLogger(__name__)

def build_prompts(tokenizer, examples: Sequence[dict], layout: SpiderLayout, sample_rows: int = 0) -> list[str]:
    """The inference prompt of each example: exactly the training prompt up to the answer."""
    prompts = []
    for example in examples:
        db_path = layout.db_path(example["db_id"])
        schema = schema_text(db_path, sample_rows) if db_path else ""
        prompt, _ = render(tokenizer, schema, example["question"])
        prompts.append(prompt)
    return prompts


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: eos plus the chat template's end-of-turn token when it is one token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    marker = end_of_turn(tokenizer).strip()
    if marker:
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(marker_ids) == 1:
            ids.add(marker_ids[0])
    return sorted(ids)


def length_sorted_batches(prompts: Sequence[str], tokenizer, batch_size: int) -> list[list[int]]:
    """Indices of the prompts grouped into batches of similar token length (longest first)."""
    if not prompts:  # every answer already stored (a resumed run), or a process of a launch with no share
        return []
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 160,
    done: Callable[[list[int], list[str], float], None] | None = None,
    skip: Iterable[int] = (),
    continuous: bool = False,
    **generate_kwargs,
) -> list[str | None]:
    """Greedy answers for the prompts, batched with left padding; `done(indices, texts, seconds)` after each batch.

    With `continuous`, each batch goes to transformers' continuous batching (`generate_batch`: paged attention,
    no padding, a finished answer leaves the batch) instead of one padded `generate` call.
    `generate_kwargs` go to `model.generate` (e.g. cache_implementation="static" for the GPU benchmark).
    """
    tokenizer.padding_side = "left"
    skip = set(skip)
    todo = [i for i in range(len(prompts)) if i not in skip]
    outputs: list[str | None] = [None] * len(prompts)
    eos = stop_token_ids(tokenizer)
    batches = length_sorted_batches([prompts[i] for i in todo], tokenizer, batch_size)
    for batch in tqdm(batches, desc="generating SQL", unit="batch"):
        indices = [todo[i] for i in batch]
        start = time.perf_counter()
        if continuous:
            texts = _generate_continuous(model, tokenizer, [prompts[i] for i in indices], max_new_tokens, eos)
        else:
            texts = _generate_padded(model, tokenizer, [prompts[i] for i in indices], max_new_tokens, eos,
                                     **generate_kwargs)
        for i, text in zip(indices, texts):
            outputs[i] = text
        if done:
            done(indices, texts, time.perf_counter() - start)
    return outputs


@torch.inference_mode()
def _generate_padded(model, tokenizer, prompts: list[str], max_new_tokens: int, eos: list[int],
                     **generate_kwargs) -> list[str]:
    """Greedy answers of one left-padded `generate` call."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _generate_continuous(model, tokenizer, prompts: list[str], max_new_tokens: int, eos: list[int]) -> list[str]:
    """Greedy answers through transformers' continuous batching, in the order of the prompts.

    Not under inference mode: the batching manager's thread updates tensors made here in place.
    """
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]  # one batched call
    results = list(model.generate_batch(inputs=ids, generation_config=config).values())
    failed = [r.request_id for r in results if r.error is not None]
    if len(results) != len(prompts) or failed:  # generate_batch logs and leaves out what failed
        raise RuntimeError(f"continuous batching answered {len(results) - len(failed)} of {len(prompts)} prompts "
                           "(errors above); generate without continuous batching instead")
    return [tokenizer.decode(r.generated_tokens, skip_special_tokens=True) for r in results]


def score(
    examples: Sequence[dict], sqls: Sequence[str], layout: SpiderLayout, *, timeout: float = 30.0
) -> dict:
    """Execution accuracy of the extracted SQL against the gold queries (overall, by hardness, error classes)."""
    return execution_accuracy(
        list(sqls),
        [e["query"] for e in examples],
        [e["db_id"] for e in examples],
        str(layout.database_dir),
        timeout=timeout,
        table_file=str(layout.tables_file) if layout.tables_file else None,
    )


def evaluate_text_to_sql(
    model,
    tokenizer,
    examples: Sequence[dict],
    layout: SpiderLayout,
    *,
    store=None,
    run_id: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 160,
    sample_rows: int = 0,
    timeout: float = 30.0,
    resume: bool = True,
    spool: Spool | None = None,
) -> dict | None:
    """Generate, extract and score; every answer goes to the store as soon as its batch is done (resumable).

    resume=False generates every answer again (--force) instead of reusing those the store holds for run_id.
    With several processes (scripts/distributed.py) each generates its share of the examples; the main process
    (the only one with a store) gathers the answers, scores and returns the summary; the others return None,
    and keep their answers in `spool` until the main process has them, so an interruption loses none.
    """
    prompts = build_prompts(tokenizer, examples, layout, sample_rows)
    if store and spool:  # what other processes generated before an interruption
        recovered = spool.drain(lambda rows: store.add_sql(run_id, rows), resume)
        if recovered:
            log.info("recovered %d answers generated by other processes before the interruption", recovered)
    previous = {row["example_key"]: row for row in store.sql_rows(run_id)} if store and resume else {}
    keys = [example_key(e) for e in examples]
    raw: list[str | None] = [previous[k]["raw_output"] if k in previous else None for k in keys]
    latency: list[float | None] = [previous[k]["latency_s"] if k in previous else None for k in keys]
    if previous:
        log.info("resuming: %d of %d answers already in the store", sum(r is not None for r in raw), len(raw))
    raw, latency = distributed.broadcast((raw, latency))  # what the main process's store already holds
    todo = [i for i, r in enumerate(raw) if r is None]
    mine = {todo[j] for j in distributed.shard(len(todo))}  # this process's share of what is left (all, alone)

    def save(indices: list[int], texts: list[str], seconds: float) -> None:
        for i, text in zip(indices, texts):
            raw[i], latency[i] = text, seconds / len(indices)
        rows = [_row(examples[i], keys[i], raw[i], latency[i]) for i in indices]
        if store:
            store.add_sql(run_id, rows)
        elif spool:
            spool.append(distributed.rank(), rows)

    generate(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        done=save,
        skip=[i for i in range(len(prompts)) if i not in mine],
    )
    shares = distributed.gather({i: (raw[i], latency[i]) for i in sorted(mine)})
    if shares is None:
        return None
    others = [i for share in shares[1:] for i in share]  # the other processes' answers (the main's are in raw)
    for share in shares[1:]:
        for i, (text, seconds) in share.items():
            raw[i], latency[i] = text, seconds
    if store and others:
        store.add_sql(run_id, [_row(examples[i], keys[i], raw[i], latency[i]) for i in others])
    if store and spool:
        spool.clear()
    sqls = [extract_sql(text or "", layout.db_path(e["db_id"])) for text, e in zip(raw, examples)]
    summary = score(examples, sqls, layout, timeout=timeout)
    if store:
        rows = []
        for example, key, text, sql, seconds, result in zip(examples, keys, raw, sqls, latency, summary["per_example"]):
            rows.append(_row(example, key, text, seconds, sql=sql, result=result))
        store.add_sql(run_id, rows)
    return summary


def example_key(example: dict) -> str:
    """A stable key of a Spider example (db_id and question)."""
    return f"{example['db_id']}::{example['question']}"


def _row(example: dict, key: str, raw: str | None, latency: float | None, *, sql=None, result=None) -> dict:
    """One row for the results store."""
    return {
        "example_key": key,
        "db_id": example["db_id"],
        "question": example["question"],
        "gold_sql": example["query"],
        "raw_output": raw,
        "extracted_sql": sql,
        "correct": None if result is None else result["correct"],
        "error": None if result is None else result["error"],
        "hardness": None if result is None else result["hardness"],
        "latency_s": latency,
    }


class ModelCache:
    """Keeps the last loaded model, so the baseline EX and MMLU stages share one load of the base model."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self._key: str | None = None
        self._loaded = None

    def get(self, adapter: str | None = None):
        """(model, tokenizer) for the base model, or the base model with this adapter."""
        key = adapter or ""
        if self._key != key:
            from scripts.models import load_model_and_tokenizer

            self.release()  # free the previous model before loading the next one
            self._loaded = load_model_and_tokenizer(
                self.settings.base_model_id,
                adapter=adapter,
                quantization=self.settings.quantization,
                token=self.settings.hf_token,
            )
            self._key = key
        return self._loaded

    def release(self) -> None:
        """Drop the cached model and give its memory back (before training loads its own copy)."""
        from scripts.gpu_memory import release_memory

        self._key, self._loaded = None, None
        release_memory()


def dev_examples(settings, layout: SpiderLayout) -> list[dict]:
    """The Spider dev examples to evaluate (seeded subset), also written to PATH_TASK_EVAL_DATASET (main process)."""
    from scripts.spider_data import load_split, missing_databases, sample_examples

    examples = sample_examples(load_split(layout, "dev"), settings.sample_size_eval, settings.seed)
    if not distributed.is_main():  # the same seeded sample; the main process warns and writes the file
        return examples
    missing = missing_databases(layout, examples)
    if missing:
        log.warning(
            "%d of %d dev examples have no database and are excluded from EX: %s",
            sum(missing.values()), len(examples), dict(missing),
        )
    path = settings.path_task_eval_dataset
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: e[k] for k in ("db_id", "question", "query")}) + "\n" for e in examples))
    return examples


def ex_stage(stage: str, name: str, settings, cache, store, models: ModelCache, layout: SpiderLayout, examples, adapter=None):
    """Stage 2 or 5: execution accuracy of the base model or of one adapter, saved as `name` and resumable."""
    key = _ex_key(settings, examples, adapter)
    if stage not in settings.stages:
        return cache.load(name, key)

    def compute() -> dict | None:
        model, tokenizer = models.get(adapter)
        run_id = None if store is None else store.start_run(  # no store on the other processes of a launch
            kind=name,
            model=settings.base_model_id,
            adapter=adapter,
            config={"max_new_tokens": settings.max_new_tokens, "schema_sample_rows": settings.schema_sample_rows},
            data_fingerprint=key,
        )
        run_id = distributed.broadcast(run_id)
        log.info("%s: generating SQL for %d dev examples", name, len(examples))
        start = time.perf_counter()
        summary = evaluate_text_to_sql(
            model, tokenizer, examples, layout,
            store=store, run_id=run_id,
            batch_size=settings.eval_batch_size, max_new_tokens=settings.max_new_tokens,
            sample_rows=settings.schema_sample_rows, timeout=settings.sql_timeout_s,
            resume=not settings.force,  # --force generates every answer again
            spool=Spool(settings.db_path, "sql", run_id),
        )
        if summary is None:  # another process of a launch: the main process scores, cache.run passes its result on
            return None
        summary.pop("per_example", None)
        summary.update(run_id=run_id, adapter=adapter, seconds=round(time.perf_counter() - start, 1))
        log.info("%s: EX %.1f%% on %d examples (%s)", name, 100 * summary["ex"], summary["count"], summary["by_hardness"])
        return summary

    return cache.run(name, key, compute)


def adapters_stage(settings, cache, store, models: ModelCache, layout: SpiderLayout, examples, adapters: dict) -> dict:
    """Stage 5: execution accuracy of every trained adapter."""
    results = {}
    for run_name, run in adapters.items():
        result = ex_stage("eval_adapters", f"ex_{run_name}", settings, cache, store, models, layout, examples, adapter=run["adapter_dir"])
        if result is not None:
            results[run_name] = result
    return results


def best_adapter(tuned: dict) -> str | None:
    """The adapter directory with the highest dev EX (the first on a tie), or None without any."""
    if not tuned:
        return None
    best = max(tuned, key=lambda name: tuned[name]["ex"])
    return tuned[best]["adapter"]


def _ex_key(settings, examples, adapter) -> str:
    """What an EX result depends on."""
    from scripts.run_state import fingerprint

    adapter_stamp = None
    if adapter:
        weights = sorted(Path(adapter).glob("adapter_model*"))
        adapter_stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    return fingerprint(
        settings.base_model_id, adapter, adapter_stamp, [example_key(e) for e in examples],
        settings.max_new_tokens, settings.schema_sample_rows, settings.sql_timeout_s,
    )


def evaluate_sample_live(results: dict, db_path: Path, n: int) -> dict:
    """Reload the best adapter, regenerate SQL for n stored dev examples; agreement with the store and EX of both."""
    import os
    import random

    from scripts.models import load_model_and_tokenizer
    from scripts.spider_data import prepare_spider
    from scripts.store import ResultsStore

    s = results["settings"]
    best = next(r for r in results["runs"].values() if r["adapter_dir"] == results["best_adapter"])
    with ResultsStore(db_path) as store:
        stored = [r for r in store.sql_rows(best["ex"]["run_id"]) if r["correct"] is not None]
    sample = random.Random(s["seed"]).sample(stored, min(n, len(stored)))
    examples = [{"db_id": r["db_id"], "question": r["question"], "query": r["gold_sql"]} for r in sample]
    layout = prepare_spider(Path(s["spider_zip"]), Path(s["data_dir"]))
    model, tokenizer = load_model_and_tokenizer(
        s["base_model_id"], adapter=results["best_adapter"], quantization=s["quantization"], token=os.environ.get("HF_TOKEN")
    )
    prompts = build_prompts(tokenizer, examples, layout, s["schema_sample_rows"])
    texts = generate(model, tokenizer, prompts, batch_size=s["eval_batch_size"], max_new_tokens=s["max_new_tokens"])
    sqls = [extract_sql(t or "", layout.db_path(e["db_id"])) for t, e in zip(texts, examples)]
    live = score(examples, sqls, layout, timeout=s["sql_timeout_s"])["per_example"]
    return {
        "n": len(sample),
        "agreement": sum(a == r["extracted_sql"] for a, r in zip(sqls, sample)) / max(1, len(sample)),
        "live_correct": sum(bool(r["correct"]) for r in live),
        "stored_correct": sum(bool(r["correct"]) for r in sample),
    }
