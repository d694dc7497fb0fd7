"""Benchmark of Spider dev SQL generation: decoders, batch sizes and caches against the pruned decoder, in one process.

Usage: python -m bench.bench_generation MODEL SPIDER_ZIP [--n N] [--quantization none|4bit] [--adapter DIR]
    [--eval-precision 4bit|merged] [--only NAME,...] [--out DIR]
Every variant generates greedily for the same N dev prompts; printed: seconds, ratio to the reference, how many
answers are identical to the reference's (greedy decoding in other batch shapes can flip near-ties in bf16), and
the variant's EX with the examples it gets right that the reference gets wrong and the reverse (what the
differences cost).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench import save_json, timed, warm_up
from scripts.answers import build_prompts, extract_answers, score
from scripts.databases import SpiderLayout
from scripts.generation import generate
from scripts.models import load_for_evaluation
from scripts.spider_release import load_split, prepare_spider

CONCATENATING = {"roomy_cache": False}  # transformers' cache: each step concatenates every layer anew
VARIANTS = {  # name: (batch size, extra generate arguments); the first is the reference (names hold no comma)
    "batch 1024 pruned roomy cache (the decoder before the graph one)": (1024, {"decoder": "prune"}),
    "batch 1024 graph (static caches and CUDA graphs)": (1024, {"decoder": "graph"}),
    "batch 256 pruned roomy cache": (256, {"decoder": "prune"}),
    "batch 256 graph": (256, {"decoder": "graph"}),
    "batch 16 pruned roomy cache": (16, {"decoder": "prune"}),
    "batch 16 graph": (16, {"decoder": "graph"}),
    "batch 256 model.generate (the pipeline until 2026-12-03)": (256, {"decoder": "hf"}),
    "batch 256 pruned concatenating cache (ended answers leave the batch)": (256, {"decoder": "prune", **CONCATENATING}),
    "batch 1024 model.generate": (1024, {"decoder": "hf"}),
    "batch 1024 pruned concatenating cache": (1024, {"decoder": "prune", **CONCATENATING}),
    "batch 16 model.generate": (16, {"decoder": "hf"}),
    "batch 256 static cache (compiled) model.generate": (256, {"decoder": "hf", "cache_implementation": "static"}),
}


def correct_flags(texts: list[str], examples: list[dict], layout: SpiderLayout) -> list[bool]:
    """Whether each answer's extracted SQL gives the gold query's result (the pipeline's extraction and metric)."""
    per_example = score(examples, [x.sql for x in extract_answers(texts, examples, layout)], layout)["per_example"]
    return [bool(r["correct"]) for r in per_example]


def main() -> None:
    """Generate with each variant and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("spider_zip", type=Path)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--quantization", default="none")
    p.add_argument("--adapter", default=None, help="a trained adapter folder (results/<run>/adapter)")
    p.add_argument("--eval-precision", default="4bit", help="4bit (as --quantization) or merged (scripts/models.py)")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--warm-up-s", type=float, default=20.0, help="seconds of generation before anything is timed")
    p.add_argument("--only", default="", help="comma-separated variant names (or parts of names) to run besides the "
                   "reference")
    args = p.parse_args()
    layout = prepare_spider(args.spider_zip, Path("data/spider_data"))
    examples = [e for e in load_split(layout, "dev") if layout.db_path(e["db_id"])][: args.n]
    model, tokenizer = load_for_evaluation(args.model, args.adapter, args.quantization, args.eval_precision)
    prompts = build_prompts(tokenizer, examples, layout)
    warm_up(model, tokenizer, prompts, args.warm_up_s)
    rows, reference = [], None
    only = set(args.only.split(",")) if args.only else None
    for name, (batch_size, extra) in VARIANTS.items():
        if only and not any(o == name or (o not in VARIANTS and o in name) for o in only) \
                and name != next(iter(VARIANTS)):
            continue
        texts, seconds = timed(lambda: generate(model, tokenizer, prompts, batch_size=batch_size,
                                                max_new_tokens=args.max_new_tokens, **extra))
        correct = correct_flags(texts, examples, layout)
        reference = reference or (texts, seconds, correct)
        same = sum(a == b for a, b in zip(texts, reference[0]))
        gained = sum(c and not r for c, r in zip(correct, reference[2]))
        lost = sum(r and not c for c, r in zip(correct, reference[2]))
        rows.append({"variant": name, "seconds": round(seconds, 2), "ratio": reference[1] / seconds,
                     "identical": same, "n": len(texts), "ex": round(100 * sum(correct) / len(correct), 2),
                     "gained": gained, "lost": lost})
        save_json(args.out, "bench_generation.json", rows)  # kept if a later variant runs out of time or memory
        print(f"{name}: {seconds:.1f} s, {same}/{len(texts)} identical to the reference, EX {rows[-1]['ex']}% "
              f"(+{gained} -{lost})", flush=True)
    print(f"{'variant':60} {'seconds':>8} {'speed-up':>8} {'identical':>10} {'EX %':>6} {'+/-':>8}")
    for r in rows:
        print(f"{r['variant']:60} {r['seconds']:8.1f} {r['ratio']:8.2f} {r['identical']:>5}/{r['n']} "
              f"{r['ex']:6.1f} {'+%d -%d' % (r['gained'], r['lost']):>8}")
    save_json(args.out, "bench_generation.json", rows)


if __name__ == "__main__":
    main()
