"""Where Spider dev generation spends its time: the prefill against the decoding steps, per batch.

Usage: python -m bench.profile_generation MODEL SPIDER_ZIP [--batch-sizes 256,1024] [--quantization none]
    [--adapter DIR] [--eval-precision 4bit|merged] [--max-new-tokens 160] [--n N] [--decoders hf,prune,graph]
    [--caches roomy,concat,static] [--kernels N] [--out DIR]
For each batch size it generates the answers of the dev questions that have a database twice, with the
pipeline's code: once with one new token (the prefill and one step), once with --max-new-tokens. Printed per
batch: its size and longest prompt, both times, the decoding steps it ran (its longest answer in tokens, plus
the end token) and the milliseconds per step; with --kernels N, the N ops that took the most time in one batch.
A diagnosis, not a benchmark: it prints no ratio.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench import save_json, warm_up
from scripts.answers import build_prompts
from scripts.generation import generate, length_sorted_batches
from scripts.models import load_for_evaluation
from scripts.spider_release import load_split, prepare_spider


CACHES = {  # the pruned decoder's (roomy), transformers' concatenating one, a compiled static one (hf only)
    "roomy": {}, "concat": {"roomy_cache": False}, "static": {"cache_implementation": "static"},
}
ALLOWED = {"prune": ("roomy", "concat"), "hf": ("concat", "static"), "graph": ("roomy",)}  # graph: its own caches


def timed_batches(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                  decoder: str = "hf", **options) -> list[tuple]:
    """(indices, texts, seconds) of each batch, in the order generated."""
    batches: list[tuple] = []
    generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, decoder=decoder,
             done=lambda indices, texts, seconds: batches.append((indices, texts, seconds)), **options)
    return batches


def kernel_table(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, decoder: str,
                 cache: str, rows: int) -> str:
    """The ops that took the most time while the first batch generated (torch.profiler: self CUDA time on a
    GPU, self CPU time without one), as torch prints them."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = torch.cuda.is_available()
    first = length_sorted_batches(prompts, tokenizer, batch_size)[0]
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as trace:
        generate(model, tokenizer, [prompts[i] for i in first], batch_size=batch_size, max_new_tokens=max_new_tokens,
                 decoder=decoder, **CACHES[cache])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return trace.key_averages().table(sort_by=key, row_limit=rows)


def profile(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
            decoder: str = "hf", cache: str = "roomy") -> list[dict]:
    """One row per batch: prefill seconds, whole seconds, decoding steps and milliseconds per step."""
    options = CACHES[cache]
    prefill = timed_batches(model, tokenizer, prompts, batch_size, 1, decoder, **options)
    whole = timed_batches(model, tokenizer, prompts, batch_size, max_new_tokens, decoder, **options)
    rows = []
    for (indices, _, first), (same, texts, seconds) in zip(prefill, whole):
        assert indices == same, "both passes batch the prompts the same way"
        steps = min(max_new_tokens, 1 + max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts))
        longest = max(len(tokenizer(prompts[i], add_special_tokens=False)["input_ids"]) for i in indices)
        rows.append({"decoder": decoder, "cache": cache, "batch_size": batch_size, "size": len(indices),
                     "longest_prompt": longest, "prefill_s": round(first, 2), "whole_s": round(seconds, 2), "steps": steps,
                     "ms_per_step": round(1000 * (seconds - first) / max(1, steps - 1), 1)})
    return rows


def main() -> None:
    """Profile each batch size and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("spider_zip", type=Path)
    p.add_argument("--batch-sizes", default="256,1024")
    p.add_argument("--quantization", default="none")
    p.add_argument("--adapter", default=None, help="a trained adapter folder (results/<run>/adapter)")
    p.add_argument("--eval-precision", default="4bit", help="4bit (as --quantization) or merged (scripts/models.py)")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--warm-up-s", type=float, default=20.0, help="seconds of generation before anything is timed")
    p.add_argument("--n", type=int, default=None, help="only the first N dev questions that have a database")
    p.add_argument("--decoders", default="hf", help="comma-separated: hf (model.generate), prune or graph "
                   "(scripts/generation.py; graph runs with cache roomy only, its static caches being its own)")
    p.add_argument("--caches", default="roomy,concat", help="comma-separated: roomy and concat (the pruned decoder "
                   "with room for the answer, or transformers' concatenating cache), static (model.generate with a "
                   "compiled static cache); a name may repeat, to see the run-to-run spread")
    p.add_argument("--kernels", type=int, default=0, help="also print (and save) the N ops that took the most time "
                   "in each decoder and cache's first batch at the first batch size (torch.profiler)")
    args = p.parse_args()
    layout = prepare_spider(args.spider_zip, Path("data/spider_data"))
    examples = [e for e in load_split(layout, "dev") if layout.db_path(e["db_id"])][: args.n]
    model, tokenizer = load_for_evaluation(args.model, args.adapter, args.quantization, args.eval_precision)
    prompts = build_prompts(tokenizer, examples, layout)
    warm_up(model, tokenizer, prompts, args.warm_up_s)
    rows = []
    for decoder in args.decoders.split(","):
        for cache in args.caches.split(","):
            if cache not in ALLOWED[decoder]:
                continue  # the roomy cache is the pruned decoder's; model.generate's default one concatenates
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                rows += profile(model, tokenizer, prompts, batch_size, args.max_new_tokens, decoder, cache)
                save_json(args.out, "profile_generation.json", rows)
    print(f"{'decoder':>7} {'cache':>7} {'batch size':>10} {'size':>5} {'longest prompt':>14} {'prefill s':>9} {'whole s':>8} {'steps':>6} "
          f"{'ms/step':>8}")
    for r in rows:
        print(f"{r['decoder']:>7} {r['cache']:>7} {r['batch_size']:10} {r['size']:5} {r['longest_prompt']:14} {r['prefill_s']:9.2f} {r['whole_s']:8.2f} "
              f"{r['steps']:6} {r['ms_per_step']:8.1f}")
    for decoder, cache in sorted({(r["decoder"], r["cache"]) for r in rows}) if args.kernels else ():
        table = kernel_table(model, tokenizer, prompts, int(args.batch_sizes.split(",")[0]), args.max_new_tokens,
                             decoder, cache, args.kernels)
        print(f"\n{decoder}, {cache} cache: the {args.kernels} ops that took the most time\n{table}")
        if args.out:
            (args.out / f"kernels_{decoder}_{cache}.txt").write_text(table)


if __name__ == "__main__":
    main()
