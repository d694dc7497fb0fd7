"""The command line: main.py's flags in groups, each help ending with its default, and --help's stage table."""
from __future__ import annotations

import argparse
import re
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path

from scripts.settings import (
    ALL, AUTO, EVAL_PRECISIONS, QUANTIZATIONS, SELECT_ADAPTER_ON, STAGE_SUMMARIES, STAGES, Settings, positive_int,
)


def parse_args(argv: list[str] | None = None, defaults: dict | None = None) -> argparse.Namespace:
    """Command-line flags; each overrides a constant of main.py or a .env value (`defaults`: shown by --help)."""
    return build_parser(defaults or {}).parse_args(argv)


_DEFAULT = re.compile(r"\(default: [^)]*\)")
_GLUE = "\0"  # a space that textwrap does not break at


class _HelpFormatter(argparse.HelpFormatter):
    """Words kept whole when wrapped (model ids, <results-dir>); the epilog's indented stage table as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def _split_lines(self, text: str, width: int) -> list[str]:
        """An option's help wrapped to width, its '(default: ...)' kept on one line where it fits."""
        text = _DEFAULT.sub(lambda m: _keep_together(m[0], width), " ".join(text.split()))
        lines = textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)
        return [line.replace(_GLUE, " ") for line in lines]

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """The description and the epilog wrapped line by line; lines indented by two spaces kept as they are."""
        return "\n".join(indent + line if line.startswith("  ") else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent,
                                       break_on_hyphens=False, break_long_words=False)
                         for line in text.splitlines())


def _keep_together(default: str, width: int) -> str:
    """'(default: ...)' on one line when it fits, else at least '(default: <first word>'."""
    return default.replace(" ", _GLUE) if len(default) <= width else default.replace(" ", _GLUE, 1)


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    """The flags in groups, each with a one-line help that ends with its default (main.py's constants)."""
    d = _DefaultText(defaults)
    p = argparse.ArgumentParser(
        prog="main.py", formatter_class=_HelpFormatter, epilog=_epilog(),
        usage="%(prog)s [-h] [--demo] [--stages STAGE[,STAGE...]] [OPTION ...]",
        description="Fine-tune an open LLM for Text-to-SQL with QLoRA; report Spider EX (execution accuracy) "
                    "before and after, and what it cost on MMLU.")
    for add_flags in (_run_flags, _model_flags, _evaluation_flags, _voting_flags, _input_output_flags):
        add_flags(p, d)
    return p


def _run_flags(p: argparse.ArgumentParser, d: _DefaultText) -> None:
    """Which stages run, and how."""
    run = p.add_argument_group("what to run")
    run.add_argument("--stages", metavar="STAGE[,STAGE...]",
                     help="only these stages, comma-separated; the others reuse their saved results (default: all, "
                          "listed below)")
    run.add_argument("--demo", action="store_true", default=None,
                     help="the bundled demo data and SmolLM2-135M-Instruct, minutes on a CPU (no input flags)")
    run.add_argument("--force", action="store_true", default=None, help="redo the stages and training runs that exist")
    run.add_argument("--env-file", type=Path, default=None, metavar="FILE",
                     help="settings file (default: .env when it exists)")


def _model_flags(p: argparse.ArgumentParser, d: _DefaultText) -> None:
    """The base model and its training runs."""
    model = p.add_argument_group("model and training")
    model.add_argument("--model", dest="base_model_id", metavar="MODEL",
                       help=f"base model: Hub id, local folder or .gguf file (default: {d('base_model_id')})")
    model.add_argument("--quantization", choices=QUANTIZATIONS,
                       help=f"auto: 4-bit NF4 on CUDA, float32 LoRA on CPU (default: {d('quantization')})")
    model.add_argument("--training-configs", metavar="JSON|FILE",
                       help="JSON list of hyper-parameter dicts, one training run each, or a .json file holding it "
                            f"(default: {d('training_configs')})")
    model.add_argument("--sample-size-train", type=_size, metavar="N",
                       help=f"train examples (a seeded subset), or 'all' (default: {d('sample_size_train')})")
    model.add_argument("--seed", type=int, metavar="N",
                       help=f"seed of the subsets, the training runs and the sampling (default: {d('seed')})")


def _evaluation_flags(p: argparse.ArgumentParser, d: _DefaultText) -> None:
    """EX on the evaluation sets, MMLU, and the choice of the best adapter."""
    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--sample-size-eval", type=_size, metavar="N",
                            help="examples of each evaluation set (a seeded subset), or 'all' "
                                 f"(default: {d('sample_size_eval')})")
    evaluation.add_argument("--eval-batch-size", type=_batch_size, metavar="N|auto",
                            help="questions per generation and MMLU batch, or 'auto': per batch, the most that fit "
                                 f"the GPU memory free when the stage starts (16 on a CPU) "
                                 f"(default: {d('eval_batch_size')})")
    evaluation.add_argument("--max-new-tokens", type=int, metavar="N",
                            help=f"token limit of each generated SQL answer (default: {d('max_new_tokens')})")
    evaluation.add_argument("--eval-precision", choices=EVAL_PRECISIONS,
                            help="4bit: as trained; merged: the adapter merged into the unquantized weights it was "
                                 f"trained on, faster, more memory (default: {d('eval_precision')})")
    evaluation.add_argument("--sql-timeout", dest="sql_timeout_s", type=float, metavar="SECONDS",
                            help=f"time limit of each SQL query (default: {d('sql_timeout_s')})")
    evaluation.add_argument("--mmlu-per-subject", type=_size, metavar="N",
                            help=f"MMLU questions per subject (57 subjects), or 'all' "
                                 f"(default: {d('mmlu_per_subject')})")
    evaluation.add_argument("--mmlu-k-shot", type=int, metavar="K",
                            help=f"worked examples before each MMLU question (default: {d('mmlu_k_shot')})")
    evaluation.add_argument("--select-adapter-on", choices=SELECT_ADAPTER_ON,
                            help="the best adapter by greedy or voted EX on the first evaluation set "
                                 f"(default: {d('select_adapter_on')})")


def _voting_flags(p: argparse.ArgumentParser, d: _DefaultText) -> None:
    """Execution-guided voting over sampled SQL candidates."""
    voting = p.add_argument_group("execution-guided voting")
    voting.add_argument("--num-candidates", type=int, metavar="N",
                        help=f"sampled SQL candidates per question; 0 or 1: off (default: {d('num_candidates')})")
    voting.add_argument("--vote-temperature", type=float, metavar="T",
                        help=f"temperature of the sampled candidates (default: {d('vote_temperature')})")
    voting.add_argument("--vote-top-p", type=float, metavar="P",
                        help=f"top-p of the sampled candidates (default: {d('vote_top_p')})")


def _input_output_flags(p: argparse.ArgumentParser, d: _DefaultText) -> None:
    """The data read and the folders written."""
    inputs = p.add_argument_group("inputs (Spider's unless you give your own)")
    inputs.add_argument("--ft-dataset", dest="path_ft_dataset", type=Path, metavar="FILE",
                        help="your train set: JSON list or JSON lines of {question, query, db_id} "
                             "(default: Spider train)")
    inputs.add_argument("--eval-dataset", dest="path_task_eval_dataset", metavar="FILE[,FILE...]",
                        help="your evaluation set(s), same format, each reported under its file name; the best "
                             "adapter is chosen on the first (default: Spider dev)")
    inputs.add_argument("--databases", dest="path_databases", type=Path, metavar="DIR",
                        help="folder of <db_id>/<db_id>.sqlite or <db_id>.sqlite (default: Spider's databases)")
    inputs.add_argument("--spider-zip", dest="spider_zip", type=Path, metavar="PATH",
                        help="spider_data.zip or an unpacked Spider folder, not needed with all three above "
                             f"(default: {d('spider_zip')})")
    inputs.add_argument("--mmlu", dest="path_mmlu", type=Path, metavar="DIR",
                        help="MMLU folder in the original CSV layout (default: the Hub's cais/mmlu)")

    outputs = p.add_argument_group("outputs")
    outputs.add_argument("--results-dir", type=Path, metavar="DIR",
                         help=f"adapters, stage results and the report (default: {d('results_dir')})")
    outputs.add_argument("--db-path", type=Path, metavar="FILE",
                         help="the SQLite store of every answer (default: <results-dir>/results.sqlite)")


class _DefaultText:
    """A setting's default as --help shows it: main.py's constant, else the Settings field's default."""

    def __init__(self, defaults: dict) -> None:
        self.values = {f.name: f.default for f in fields(Settings) if f.default is not MISSING} | defaults

    def __call__(self, name: str) -> str:
        """The default's text, with '%' escaped for argparse."""
        if name not in self.values:
            return f"{name.upper()} in main.py"
        value = self.values[name]
        if name == "training_configs":
            text = f"TRAINING_CONFIGS in main.py, {len(value)} run{'s' * (len(value) != 1)}"
        else:
            text = "all" if value is None else str(value)
        return text.replace("%", "%%")


def _epilog() -> str:
    """The stages in order, one a line, and where the defaults come from."""
    width = max(map(len, STAGES))
    table = "\n".join(f"  {name:<{width}}  {what}" for name, what in STAGE_SUMMARIES.items())
    return (f"stages, in order:\n{table}\n\n"
            "Defaults are main.py's constants; .env (every key: .env.example) overrides them, and flags override "
            "both. A finished stage is skipped when rerun with the same inputs.")


def _batch_size(text: str) -> int | str:
    """--eval-batch-size: 'auto' or an integer; anything else is left to the settings check (one line naming it)."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        return text


def _size(text: str) -> int | str:
    """A sample size flag: a positive integer, or 'all'/'none' for everything."""
    if text.lower() in ("all", "none"):
        return ALL
    try:
        return positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
