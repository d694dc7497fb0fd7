"""Last stage: results/report.md, results/results.json and the plots, from every stage's saved result."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from scripts import distributed
from scripts.errors import UserError

log = logging.getLogger(__name__)

LEVELS = ("easy", "medium", "hard", "extra")


def report_stage(settings, eval_sets, baseline_ex, baseline_mmlu, adapters, tuned_ex, best, tuned_mmlu,
                 analysis) -> dict:
    """Write results.json, report.md and the PNG plots; return the results dict.

    `baseline_ex` is {set name: EX summary}, `tuned_ex` {run name: {set name: summary}}; `ex` is the first set's
    (the one the best adapter is chosen on), `ex_by_set` every set's.
    """
    if "report" in settings.stages and not any((baseline_ex, baseline_mmlu, adapters, tuned_ex, tuned_mmlu, analysis)):
        raise UserError(f"nothing to report for these settings: no result under {settings.results_dir / 'stages'} "
                        "is for them (a result is reused only for the same model, sample sizes and data); run the "
                        "other stages with these settings first")
    first = eval_sets[0].name if eval_sets else None
    tuned_ex = tuned_ex or {}
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.public(),
        "eval_sets": [
            {"name": d.name, "source": d.source, "examples": len(d.examples),
             "database_dir": str(d.layout.database_dir.resolve()),  # absolute: the post-run check may run elsewhere
             "tables_file": str(d.layout.tables_file.resolve()) if d.layout.tables_file else None,
             "evaluated_file": str((settings.evaluated_dir / f"{d.name}.jsonl").resolve())}
            for d in eval_sets
        ],
        "baseline": {"ex": (baseline_ex or {}).get(first), "ex_by_set": baseline_ex or {},
                     "mmlu": _without_rows(baseline_mmlu)},
        "runs": {
            name: {"training": run.get("summary"), "config": run.get("config"), "adapter_dir": run.get("adapter_dir"),
                   "ex": tuned_ex.get(name, {}).get(first), "ex_by_set": tuned_ex.get(name, {})}
            for name, run in (adapters or {}).items()
        },
        "best_adapter": best,
        "best_mmlu": _without_rows(tuned_mmlu),
        "regression": analysis,
    }
    if "report" not in settings.stages or not distributed.is_main():  # the main process alone writes files
        return results
    out = settings.results_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plots = write_plots(out, results, adapters or {}, analysis)
    (out / "report.md").write_text(render_markdown(results, plots))
    log.info("report: %s and %s", out / "report.md", out / "results.json")
    return results


RESULT_STAGES = ("baseline_ex", "baseline_mmlu", "train", "eval_adapters", "mmlu_best", "regression")


def check_something_to_report(settings) -> None:
    """--stages with report but no stage that makes results: saved stage results must exist, else a UserError."""
    if "report" not in settings.stages or set(RESULT_STAGES) & set(settings.stages):
        return
    saved = settings.results_dir / "stages"
    if not any(saved.glob("*.json")):
        raise UserError(f"nothing to report: no stage results under {saved}; run the other stages first (leave "
                        "--stages out for all of them, or set RESULTS_DIR (--results-dir) to an earlier run's folder)")


def _without_rows(mmlu: dict | None) -> dict | None:
    """An MMLU result without its per-question rows (those are in the store)."""
    return None if mmlu is None else {k: v for k, v in mmlu.items() if k != "rows"}


def _pct(value) -> str:
    """A fraction as a percentage, or a dash."""
    return "-" if value is None else f"{100 * value:.1f}"


def render_markdown(results: dict, plots: list[str]) -> str:
    """The human report: baseline vs each training config, then the regression verdict."""
    s = results["settings"]
    base_ex = results["baseline"]["ex"] or {}
    base_mmlu = results["baseline"]["mmlu"] or {}
    sets = [d["name"] for d in results.get("eval_sets", [])]
    first = sets[0] if sets else "-"
    by_run = [("baseline", results["baseline"].get("ex_by_set") or {})]
    by_run += [(n, r.get("ex_by_set") or {}) for n, r in results["runs"].items()]
    voting = any(ex.get("voted") for _, by_set in by_run for ex in by_set.values())  # voted EX only when voting was on
    lines = [
        "# Text-to-SQL fine-tuning report",
        "",
        f"Model `{s['base_model_id']}`, {results['created']}. Evaluation set `{first}`: {base_ex.get('count', '-')} "
        f"examples scored (sample size {s['sample_size_eval'] or 'all'}); "
        f"train sample {s['sample_size_train'] or 'all'}; "
        f"MMLU {s['mmlu_k_shot']}-shot, {s['mmlu_per_subject'] or 'all'} per subject. Evaluated "
        + ("as trained (quantization " + str(s.get("quantization")) + ")" if s.get("eval_precision", "4bit") == "4bit"
           else "unquantized, adapters merged into the weights they were trained on (EVAL_PRECISION=merged)") + ".",
        "",
        f"## Execution accuracy (`{first}`) and MMLU",
        "",
        "| run | EX % | " + ("voted EX % | " if voting else "") + " | ".join(f"{lv} %" for lv in LEVELS)
        + " | MMLU % | train time s | tokens/s | peak GB | batch x accumulation |",
        "| --- | ---: | " + ("---: | " if voting else "") + " | ".join("---:" for _ in LEVELS)
        + " | ---: | ---: | ---: | ---: | --- |",
        _row("baseline", base_ex, base_mmlu.get("accuracy"), None, voting=voting),
    ]
    for name, run in results["runs"].items():
        mmlu = (results["best_mmlu"] or {}).get("accuracy") if run["adapter_dir"] == results["best_adapter"] else None
        lines.append(_row(name + (" (best)" if run["adapter_dir"] == results["best_adapter"] else ""), run["ex"] or {},
                          mmlu, run["training"] or {}, run.get("config"), voting))
    if len(sets) > 1:
        lines += ["", "## Execution accuracy per evaluation set (the best adapter is chosen on the first)", "",
                  "| run | " + " | ".join(f"`{name}` EX % (n)" + (f" | `{name}` voted EX %" if voting else "")
                                          for name in sets) + " |",
                  "| --- | " + " | ".join("---:" + (" | ---:" if voting else "") for _ in sets) + " |"]
        for name, by_set in by_run:
            cells = []
            for d in sets:
                ex = by_set.get(d) or {}
                cells.append(f"{_pct(ex.get('ex'))} ({ex.get('count', '-')})")
                if voting:
                    cells.append(_pct((ex.get("voted") or {}).get("ex")))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    retried = [name for name, run in results["runs"].items() if (run["training"] or {}).get("oom_retries")]
    if retried:
        lines += ["", "Out of GPU memory in training, retried with half the per-device batch and twice the "
                      "accumulation (the same effective batch): " + ", ".join(f"`{n}`" for n in retried) + "."]
    lines += ["", "EX counts only examples whose database exists; errors by class:", ""]
    for name, by_set in by_run:
        for set_name, ex in by_set.items():
            if ex.get("errors"):
                label = name if len(sets) < 2 else f"{name}, `{set_name}`"
                lines.append(f"- {label}: " + ", ".join(f"{k} {v}" for k, v in sorted(ex["errors"].items()))
                             + _extraction_note(ex.get("extraction")))
    if voting:
        lines += _voting_section(by_run, sets, s.get("select_adapter_on", "greedy"))
    analysis = results["regression"]
    if analysis:
        lines += ["", "## Regression analysis (MMLU, fine-tuned vs base, same questions)", "", analysis.get("verdict", "")]
    lines += ["", "## Training configs", ""]
    for name, run in results["runs"].items():
        lines.append(f"- `{name}`: `{json.dumps(run['config'])}`")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _voting_section(by_run: list[tuple[str, dict]], sets: list[str], select_on: str) -> list[str]:
    """Greedy against voted EX per run and evaluation set, what the vote changed and what it cost."""
    voted = [(name if len(sets) < 2 else f"{name}, `{set_name}`", ex, ex["voted"])
             for name, by_set in by_run for set_name, ex in by_set.items() if ex.get("voted")]
    first = voted[0][2]
    chosen_on = f"{select_on} EX" + (f" of `{sets[0]}`" if len(sets) > 1 else "")
    lines = ["", "## Execution-guided voting", "",
             f"{first['n']} sampled candidates per question (temperature {first['temperature']}, top-p "
             f"{first['top_p']}, seed {first['seed']}) and the greedy answer, each executed read-only; the most "
             f"common result wins (the greedy answer's on a tie, and when none runs). The best adapter is chosen on "
             f"{chosen_on}.", "",
             "| run | greedy EX % | voted EX % | answers changed | gained | lost | voting s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, ex, v in voted:
        lines.append(f"| {name} | {_pct(ex.get('ex'))} | {_pct(v['ex'])} | {v['changed']} | {v['gained']} | "
                     f"{v['lost']} | {_num(v['seconds'], 1)} |")
    return lines


def _extraction_note(counts: dict | None) -> str:
    """'; 3 answers without SQL, 2 with prose cut' (empty for results that predate the counts)."""
    if not counts:
        return ""
    return f"; {counts['no_sql']} answers without SQL, {counts['prose_cut']} with trailing prose cut"


def _row(name: str, ex: dict, mmlu, training: dict | None, config: dict | None = None, voting: bool = False) -> str:
    """One table row (with the voted EX after the greedy EX when voting was on)."""
    by = ex.get("by_hardness") or {}
    t = training or {}
    voted = [_pct((ex.get("voted") or {}).get("ex"))] if voting else []
    cells = [name, _pct(ex.get("ex"))] + voted + [_pct((by.get(lv) or {}).get("ex")) for lv in LEVELS] + [
        _pct(mmlu),
        _num(t.get("train_seconds")),
        _num(t.get("tokens_per_second")),
        _num(t.get("peak_memory_gb"), 2),
        _batch(t, config) if training is not None else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def _batch(training: dict, config: dict | None) -> str:
    """"8 x 2", the batch trained with (a run of an earlier version: its config's), and its out-of-memory retries."""
    source = training if "per_device_train_batch_size" in training else (config or {})
    size, steps = source.get("per_device_train_batch_size"), source.get("gradient_accumulation_steps")
    if size is None or steps is None:
        return "-"
    retries = training.get("oom_retries") or 0
    return f"{size} x {steps}" + (f" ({retries} OOM {'retry' if retries == 1 else 'retries'})" if retries else "")


def _num(value, digits: int = 0) -> str:
    """A number rounded, or a dash."""
    return "-" if value is None else f"{value:.{digits}f}"


def write_plots(out: Path, results: dict, adapters: dict, analysis: dict | None) -> list[str]:
    """EX per config, loss curves and MMLU delta per subject, as PNG files next to the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = ["baseline"] + list(results["runs"])
    sets = [d["name"] for d in results.get("eval_sets", [])]
    by_run = [results["baseline"].get("ex_by_set") or {}] + [r.get("ex_by_set") or {} for r in results["runs"].values()]
    if any(by_set for by_set in by_run):
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) * max(1, len(sets)) ** 0.5), 3))
        width = 0.8 / max(1, len(sets))
        for j, set_name in enumerate(sets):  # one bar per run and evaluation set
            values = [100 * ((by_set.get(set_name) or {}).get("ex") or 0) for by_set in by_run]
            ax.bar([i + (j - (len(sets) - 1) / 2) * width for i in range(len(names))], values, width, label=set_name)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("EX %")
        ax.set_title("execution accuracy")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelrotation=20)
        written.append(_save(fig, out / "ex_per_config.png"))
    curves = {name: run.get("loss_curve") for name, run in adapters.items() if run.get("loss_curve")}
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3))
        for name, curve in curves.items():
            ax.plot([step for step, _ in curve], [loss for _, loss in curve], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "loss_curves.png"))
    per_subject = (analysis or {}).get("per_subject") or {}
    if per_subject:
        items = sorted(per_subject.items(), key=lambda kv: kv[1]["delta"])
        fig, ax = plt.subplots(figsize=(6, max(3, 0.18 * len(items))))
        ax.barh([k for k, _ in items], [100 * v["delta"] for _, v in items])
        ax.set_xlabel("MMLU accuracy delta, points (fine-tuned - base)")
        ax.tick_params(axis="y", labelsize=6)
        written.append(_save(fig, out / "mmlu_delta_per_subject.png"))
    return written


def _save(fig, path: Path) -> str:
    """Save and close a figure; return its name relative to the report."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name
