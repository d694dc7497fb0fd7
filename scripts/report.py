"""Last stage: results/report.md, results/results.json and the plots, from every stage's saved result."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from scripts import distributed

log = logging.getLogger(__name__)

LEVELS = ("easy", "medium", "hard", "extra")


def report_stage(settings, baseline_ex, baseline_mmlu, adapters, tuned_ex, best, tuned_mmlu, analysis) -> dict:
    """Write results.json, report.md and the PNG plots; return the results dict."""
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.public(),
        "baseline": {"ex": baseline_ex, "mmlu": _without_rows(baseline_mmlu)},
        "runs": {
            name: {"training": run.get("summary"), "config": run.get("config"), "adapter_dir": run.get("adapter_dir"),
                   "ex": tuned_ex.get(name)}
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
    evaluated = [("baseline", base_ex)] + [(n, r["ex"] or {}) for n, r in results["runs"].items()]
    voting = any(ex.get("voted") for _, ex in evaluated)  # the voted EX column only when voting was on
    lines = [
        "# Text-to-SQL fine-tuning report",
        "",
        f"Model `{s['base_model_id']}`, {results['created']}. Spider dev examples: {base_ex.get('count', '-')} scored "
        f"(sample size {s['sample_size_eval'] or 'all'}); train sample {s['sample_size_train'] or 'all'}; "
        f"MMLU {s['mmlu_k_shot']}-shot, {s['mmlu_per_subject'] or 'all'} per subject.",
        "",
        "## Execution accuracy (Spider dev) and MMLU",
        "",
        "| run | EX % | " + ("voted EX % | " if voting else "") + " | ".join(f"{lv} %" for lv in LEVELS)
        + " | MMLU % | train time s | tokens/s | peak GB |",
        "| --- | ---: | " + ("---: | " if voting else "") + " | ".join("---:" for _ in LEVELS)
        + " | ---: | ---: | ---: | ---: |",
        _row("baseline", base_ex, base_mmlu.get("accuracy"), None, voting),
    ]
    for name, run in results["runs"].items():
        mmlu = (results["best_mmlu"] or {}).get("accuracy") if run["adapter_dir"] == results["best_adapter"] else None
        lines.append(_row(name + (" (best)" if run["adapter_dir"] == results["best_adapter"] else ""), run["ex"] or {},
                          mmlu, run["training"] or {}, voting))
    lines += ["", "EX counts only examples whose database exists; errors by class:", ""]
    for name, ex in evaluated:
        if ex.get("errors"):
            lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(ex["errors"].items())))
    if voting:
        lines += _voting_section(evaluated, s.get("select_adapter_on", "greedy"))
    analysis = results["regression"]
    if analysis:
        lines += ["", "## Regression analysis (MMLU, fine-tuned vs base, same questions)", "", analysis.get("verdict", "")]
    lines += ["", "## Training configs", ""]
    for name, run in results["runs"].items():
        lines.append(f"- `{name}`: `{json.dumps(run['config'])}`")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _voting_section(evaluated: list[tuple[str, dict]], select_on: str) -> list[str]:
    """Greedy against voted EX per run, what the vote changed and what it cost."""
    voted = [(name, ex, ex["voted"]) for name, ex in evaluated if ex.get("voted")]
    first = voted[0][2]
    lines = ["", "## Execution-guided voting", "",
             f"{first['n']} sampled candidates per question (temperature {first['temperature']}, top-p "
             f"{first['top_p']}, seed {first['seed']}) and the greedy answer, each executed read-only; the most "
             f"common result wins (the greedy answer's on a tie, and when none runs). The best adapter is chosen on "
             f"{select_on} EX.", "",
             "| run | greedy EX % | voted EX % | answers changed | gained | lost | voting s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, ex, v in voted:
        lines.append(f"| {name} | {_pct(ex.get('ex'))} | {_pct(v['ex'])} | {v['changed']} | {v['gained']} | "
                     f"{v['lost']} | {_num(v['seconds'], 1)} |")
    return lines


def _row(name: str, ex: dict, mmlu, training: dict | None, voting: bool = False) -> str:
    """One table row (with the voted EX after the greedy EX when voting was on)."""
    by = ex.get("by_hardness") or {}
    t = training or {}
    voted = [_pct((ex.get("voted") or {}).get("ex"))] if voting else []
    cells = [name, _pct(ex.get("ex"))] + voted + [_pct((by.get(lv) or {}).get("ex")) for lv in LEVELS] + [
        _pct(mmlu),
        _num(t.get("train_seconds")),
        _num(t.get("tokens_per_second")),
        _num(t.get("peak_memory_gb"), 2),
    ]
    return "| " + " | ".join(cells) + " |"


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
    values = [(results["baseline"]["ex"] or {}).get("ex")] + [(r["ex"] or {}).get("ex") for r in results["runs"].values()]
    if any(v is not None for v in values):
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3))
        ax.bar(names, [100 * (v or 0) for v in values], color=["grey"] + ["tab:blue"] * (len(names) - 1))
        ax.set_ylabel("EX %")
        ax.set_title("Spider dev execution accuracy")
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
