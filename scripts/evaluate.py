"""Stages 2 and 5: execution accuracy of the base model and of each adapter on each evaluation set, resumable.

A stage's result is keyed by what it depends on (model, adapter weights, examples, databases, settings) and saved
under RESULTS_DIR/stages/; the walk of one evaluation set is `evaluate_text_to_sql`: prompts, greedy answers and
with voting on sampled candidates (scripts/answers.py, scripts/voting.py), SQL extracted and scored, all stored.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence

from scripts import distributed
from scripts.answers import answer_row, build_prompts, extract_answers, extraction_counts, greedy_answers, score
from scripts.databases import SpiderLayout
from scripts.generation import Sampling
from scripts.models import ModelCache
from scripts.run_state import adapter_stamp, fingerprint
from scripts.spider_data import missing_databases, sample_examples, set_fingerprint
from scripts.store import Spool, data_fingerprint
from scripts.voting import sample_candidates, sampling_config, vote_and_score, vote_sampling

log = logging.getLogger(__name__)


def eval_examples(settings, data) -> list:
    """Each evaluation set with the examples to evaluate (seeded subset), saved as RESULTS_DIR/eval_sets/<name>.jsonl."""
    chosen = []
    for dataset in data.eval_sets:
        examples = sample_examples(dataset.examples, settings.sample_size_eval, settings.seed)
        chosen.append(dataclasses.replace(dataset, examples=examples))
        if not distributed.is_main():  # the same seeded sample; the main process warns and writes the file
            continue
        missing = missing_databases(dataset.layout, examples)
        if missing:
            log.warning("%s: %d of %d examples have no database and are excluded from EX: %s",
                        dataset.name, sum(missing.values()), len(examples), dict(missing))
        path = settings.evaluated_dir / f"{dataset.name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({k: e[k] for k in ("db_id", "question", "query")}) + "\n" for e in examples))
    return chosen


def sets_stage(stage: str, prefix: str, settings, cache, store, models: ModelCache, eval_sets, adapter=None) -> dict:
    """Stage 2 or 5 on every evaluation set: {set name: EX summary}, each saved as `<prefix>@<set name>`."""
    results = {}
    for dataset in eval_sets:
        result = ex_stage(stage, f"{prefix}@{dataset.name}", settings, cache, store, models, dataset.layout,
                          dataset.examples, adapter=adapter)
        if result is not None:
            results[dataset.name] = result
    return results


def ex_stage(stage: str, name: str, settings, cache, store, models: ModelCache, layout: SpiderLayout, examples,
             adapter=None) -> dict | None:
    """Stage 2 or 5: execution accuracy of the base model or of one adapter, saved as `name` and resumable.

    With voting on, the stage's key adds the sampling settings; the run in the store (and so its greedy answers) is
    the same with voting on or off.
    """
    run_key = _ex_key(settings, layout, examples, adapter)
    sampling = vote_sampling(settings)
    key = fingerprint(run_key, sampling_config(sampling)) if sampling else run_key
    if stage not in settings.stages:
        return cache.load(name, key)

    def compute() -> dict | None:
        model, tokenizer = models.get(adapter)
        run_id = None if store is None else store.start_run(  # no store on the other processes of a launch
            kind=name,
            model=settings.base_model_id,
            adapter=adapter,
            config={"max_new_tokens": settings.max_new_tokens, "schema_sample_rows": settings.schema_sample_rows,
                    "eval_precision": settings.eval_precision},
            data_fingerprint=run_key,
        )
        run_id = distributed.broadcast(run_id)
        log.info("%s: generating SQL for %d examples", name, len(examples))
        start = time.perf_counter()
        summary = evaluate_text_to_sql(
            model, tokenizer, examples, layout,
            store=store, run_id=run_id,
            batch_size=settings.eval_batch_size, max_new_tokens=settings.max_new_tokens,
            sample_rows=settings.schema_sample_rows, timeout=settings.sql_timeout_s,
            resume=not settings.force,  # --force generates every answer again
            spool=Spool(settings.db_path, "sql", run_id),
            sampling=sampling,
            candidate_spool=Spool(settings.db_path, f"candidates-{data_fingerprint(sampling_config(sampling))}", run_id)
            if sampling else None,
        )
        if summary is None:  # another process of a launch: the main process scores, cache.run passes its result on
            return None
        summary.pop("per_example", None)
        summary.update(run_id=run_id, adapter=adapter, seconds=round(time.perf_counter() - start, 1))
        log.info("%s: EX %.1f%% on %d examples (%s); %d answers without SQL, %d with prose cut from their end", name,
                 100 * summary["ex"], summary["count"], summary["by_hardness"], summary["extraction"]["no_sql"],
                 summary["extraction"]["prose_cut"])
        if sampling:
            voted = summary["voted"]
            log.info("%s: voted EX %.1f%% (greedy %.1f%%) over %d candidates per example; %d answers changed "
                     "(%d gained, %d lost); %.1f s", name, 100 * voted["ex"], 100 * summary["ex"], sampling.n,
                     voted["changed"], voted["gained"], voted["lost"], voted["seconds"])
        return summary

    return cache.run(name, key, compute)


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
    sampling: Sampling | None = None,
    candidate_spool: Spool | None = None,
) -> dict | None:
    """Generate, extract and score; every answer goes to the store as soon as its batch is done (resumable).

    resume=False generates every answer again (--force) instead of reusing those the store holds for run_id.
    With several processes each generates its share of the examples; the main process (the only one with a store)
    gathers the answers, scores and returns the summary; the others return None. With `sampling` (execution-guided
    voting) n candidates per example are sampled after the greedy answers, stored the same way (`candidate_spool`
    on the other processes), and voted on: the summary gets a `voted` dict with the voted answers' EX.
    """
    prompts = build_prompts(tokenizer, examples, layout, sample_rows)
    generate_kwargs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
    answers = greedy_answers(model, tokenizer, prompts, examples, store, run_id, resume, spool, **generate_kwargs)
    candidates = None
    if sampling:
        candidates = sample_candidates(model, tokenizer, prompts, examples, store, run_id, sampling, resume,
                                       candidate_spool, **generate_kwargs)
    if answers is None:  # another process of a launch: the main process scores
        return None
    raw, latency = [a[0] for a in answers], [a[1] for a in answers]
    extractions = extract_answers(raw, examples, layout)
    sqls = [x.sql for x in extractions]
    summary = score(examples, sqls, layout, timeout=timeout)
    summary["extraction"] = extraction_counts(extractions)
    if store:
        store.add_sql(run_id, [answer_row(example, text, seconds, sql=sql, result=result) for example, text, sql,
                               seconds, result in zip(examples, raw, sqls, latency, summary["per_example"])])
    if candidates is not None:
        summary["voted"] = vote_and_score(examples, layout, sqls, summary["per_example"], candidates, sampling,
                                          timeout=timeout, store=store, run_id=run_id)
    return summary


def adapters_stage(settings, cache, store, models: ModelCache, eval_sets, adapters: dict) -> dict:
    """Stage 5: execution accuracy of every trained adapter on every evaluation set: {run name: {set name: summary}}."""
    results = {}
    for run_name, run in adapters.items():
        result = sets_stage("eval_adapters", f"ex_{run_name}", settings, cache, store, models, eval_sets,
                            adapter=run["adapter_dir"])
        if result:
            results[run_name] = result
    return results


def best_adapter(tuned: dict, eval_sets, on: str = "greedy") -> str | None:
    """The adapter directory with the highest EX on the first evaluation set, greedy or voted (`on`), the first on a
    tie; None without any."""
    first = eval_sets[0].name if eval_sets else None
    scored = {name: by_set[first] for name, by_set in tuned.items() if first in by_set}
    if not scored:
        return None
    best = max(scored, key=lambda name: (scored[name]["voted"] if on == "voted" else scored[name])["ex"])
    return scored[best]["adapter"]


def _ex_key(settings, layout: SpiderLayout, examples, adapter) -> str:
    """What an EX result depends on: the model, the adapter's weights, the examples and their databases' content."""
    return fingerprint(
        settings.base_model_id, adapter, adapter_stamp(adapter), set_fingerprint(examples, layout),
        settings.max_new_tokens, settings.schema_sample_rows, settings.sql_timeout_s, settings.quantization,
        settings.eval_precision,
    )
