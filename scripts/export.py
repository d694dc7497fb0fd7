"""Last stage, export: the best adapter merged into its base model, saved as a plain Hugging Face model folder.

RESULTS_DIR/export/ holds the merged model (`save_pretrained`, safetensors) in the compute precision (bf16, fp16 on
GPUs without bf16, float32 on CPU), merged as EVAL_PRECISION=merged merges it (scripts/models.py
load_for_evaluation: a 4-bit adapter into the dequantized NF4 weights it was trained on, a GGUF's adapter into its
dequantized weights); its tokenizer and chat template; a generation_config.json with the pipeline's stop tokens
and greedy decoding; README.md, a model card with the run's figures (results.json); text2sql.json, the prompt and
SQL settings scripts/ask.py reads; and adapter/, the adapter alone. The folder is written beside its place and
renamed into it, so an interrupted export leaves no half folder; its stage key (the adapter's weights, the base
model, the precision, the settings and the card's figures) makes a rerun with nothing changed skip it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from scripts import distributed
from scripts.run_state import StageCache, adapter_stamp, fingerprint

log = logging.getLogger(__name__)

EXPORT_DIR_NAME = "export"
ADAPTER_DIR_NAME = "adapter"
CARD_NAME = "README.md"  # written last: a folder with it is complete
SETTINGS_NAME = "text2sql.json"  # what scripts/ask.py needs to prompt and run SQL as the pipeline did
PROMPT_SETTINGS = ("schema_sample_rows", "max_new_tokens", "sql_timeout_s", "vote_temperature", "vote_top_p", "seed")


def export_dir(results_dir: Path) -> Path:
    """Where the export stage writes its folder."""
    return Path(results_dir) / EXPORT_DIR_NAME


def export_stage(settings, cache: StageCache, models, results: dict) -> dict | None:
    """The export stage: RESULTS_DIR/export/ for results["best_adapter"]; its saved result, or None."""
    if "export" not in settings.stages:
        return None
    model_id = _merge_source(settings)
    if not distributed.is_main():  # the main process alone loads, merges and writes
        return None
    best = results.get("best_adapter")
    if not best:
        log.warning("export: no trained adapter to export; run the train and eval_adapters stages first")
        return None
    out = export_dir(settings.results_dir)
    key = export_key(settings, best, results)
    saved = None if settings.force else cache.load("export", key)
    if saved is not None and (out / CARD_NAME).is_file():
        log.info("stage export: reusing %s, exported for the same adapter and settings", out)
        return saved
    result = write_export(settings, models, model_id, best, results, out)
    cache.save("export", key, result)
    return result


def _merge_source(settings) -> str:
    """What load_for_evaluation merges into: the base model id, or a GGUF's converted folder.

    Every process resolves it, so that a GGUF's conversion check (a barrier under accelerate launch) is passed by
    all of them together; the main process then loads from the folder, which needs no other process.
    """
    from scripts.model_source import prepared_source
    from scripts.models import DEFAULT_CACHE_DIR

    source = prepared_source(str(settings.base_model_id), settings.hf_token, DEFAULT_CACHE_DIR)
    return source.path if source.gguf_file is not None else str(settings.base_model_id)


def export_key(settings, best: str, results: dict) -> str:
    """What an export depends on: base model, adapter weights, precision, prompt settings, the model card's figures."""
    merge = merge_precision(settings)
    return fingerprint(settings.base_model_id, best, adapter_stamp(best), merge, prompt_settings(settings),
                       model_card(results, "", *merge))


def merge_precision(settings) -> tuple[str, str]:
    """(quantization the adapter was trained on: "4bit" or "none", the dtype the merged weights are saved in)."""
    from scripts.models import choose_quantization, precision

    return choose_quantization(settings.quantization)[0], str(precision().dtype).replace("torch.", "")


def prompt_settings(settings) -> dict:
    """The settings a user of the folder needs to prompt and run SQL as the pipeline did (text2sql.json)."""
    return {name: getattr(settings, name) for name in PROMPT_SETTINGS}


def write_export(settings, models, model_id: str, best: str, results: dict, out: Path) -> dict:
    """Merge; save model, tokenizer, generation config, adapter, settings and card in a new folder; swap it in."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted export left
    log.info("export: merging %s into %s", best, settings.base_model_id)
    model, tokenizer = merged_model(settings, models, model_id, best)
    save_model(model, tokenizer, partial, settings.max_new_tokens)
    shutil.copytree(best, partial / ADAPTER_DIR_NAME)
    details = {"base_model_id": str(settings.base_model_id), "adapter": str(best),
               "prompt_style": _prompt_style(tokenizer), **prompt_settings(settings)}
    (partial / SETTINGS_NAME).write_text(json.dumps(details, indent=1) + "\n")
    date = datetime.now(timezone.utc).date().isoformat()
    sentencepiece = (partial / "tokenizer.model").is_file() and not (partial / "tokenizer.json").is_file()
    (partial / CARD_NAME).write_text(model_card(results, date, *merge_precision(settings), sentencepiece))
    replace_folder(partial, out)
    log.info("export: %s (load it with AutoModelForCausalLM.from_pretrained; ask it: python -m scripts.ask)", out)
    return {"folder": str(out), "adapter": str(best), "dtype": str(model.dtype).replace("torch.", ""), "date": date}


def merged_model(settings, models, model_id: str, best: str):
    """(model, tokenizer): the adapter merged as EVAL_PRECISION=merged merges it (the evaluated one when it was)."""
    from scripts.models import load_for_evaluation

    if settings.eval_precision == "merged" and model_id == str(settings.base_model_id):
        return models.get(best)  # mmlu_best's model when it holds this adapter, else loaded the same way
    models.release()  # the model evaluated last leaves memory before the merged one loads
    return load_for_evaluation(model_id, best, settings.quantization, "merged", token=settings.hf_token)


def save_model(model, tokenizer, folder: Path, max_new_tokens: int) -> None:
    """Weights (safetensors), config, tokenizer and chat template, greedy decoding with the pipeline's stops."""
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generation_config(model, tokenizer, max_new_tokens).save_pretrained(folder)  # replaces the model's own


def generation_config(model, tokenizer, max_new_tokens: int):
    """Greedy decoding that stops where the pipeline's answers stop (scripts/generation.py stop_token_ids)."""
    from transformers import GenerationConfig

    from scripts.generation import stop_token_ids

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_token_ids(tokenizer, model),
                            pad_token_id=tokenizer.pad_token_id, do_sample=False, num_beams=1,
                            max_new_tokens=max_new_tokens)


def _prompt_style(tokenizer) -> str:
    """How the prompt is laid out for this tokenizer: 'system', 'folded' or 'plain' (scripts/prompts.py)."""
    from scripts.prompts import template_style

    return template_style(tokenizer)


def replace_folder(new: Path, target: Path) -> None:
    """Put `new` in `target`'s place: the old folder is renamed aside, the new one renamed in, the old one removed."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------------------

def _pct(value) -> str:
    """A fraction as a percentage with one decimal, or a dash."""
    return "-" if value is None else f"{100 * value:.1f} %"


def _best_run(results: dict) -> tuple[str, dict]:
    """(name, run) of the best adapter."""
    return next((name, run) for name, run in results["runs"].items() if run["adapter_dir"] == results["best_adapter"])


def model_card(results: dict, date: str, quantization: str, dtype: str, sentencepiece: bool = False) -> str:
    """README.md of the export: base model, how it was merged (quantization trained on, dtype), data, training
    config, EX and MMLU before and after, the date; `sentencepiece`: its tokenizer is a tokenizer.model alone."""
    s = results["settings"]
    name, run = _best_run(results)
    base = s["base_model_id"]
    hub_id = not (Path(base).exists() or base.endswith(".gguf") or base.startswith(("/", ".")))
    lines = ["---", *([f"base_model: {base}"] if hub_id else []), "library_name: transformers",
             "pipeline_tag: text-generation", "tags: [text-to-sql, sql, lora, peft]", "---", "",
             f"# {Path(base).name} fine-tuned for Text-to-SQL", "",
             f"The LoRA adapter of training run `{name}` merged into `{base}`"
             + (" (a GGUF file: merged into its dequantized weights)" if base.endswith(".gguf") else "")
             + f", {_merged_how(quantization, dtype)}. Exported {date or '-'} by text2sql-qlora "
             "(`python main.py`, stage export).", "",
             *_data_lines(results, run), *_result_lines(results, run), *_training_lines(name, run),
             *_usage_lines(sentencepiece)]
    return "\n".join(lines) + "\n"


def _merged_how(quantization: str, dtype: str) -> str:
    """How the adapter was trained and merged, in words."""
    if quantization == "4bit":
        return (f"trained on the base model's 4-bit NF4 weights (QLoRA) and merged into those weights dequantized, "
                f"in {dtype}")
    return f"trained on the base model's {dtype} weights (plain LoRA) and merged into them, in {dtype}"


def _data_lines(results: dict, run: dict) -> list[str]:
    """Where the train and evaluation examples came from."""
    s = results["settings"]
    train = s.get("path_ft_dataset") or ("the bundled demo's train set" if s.get("demo") else "Spider train")
    examples = (run.get("training") or {}).get("examples")
    sample = f"sample {s['sample_size_train']}" if s.get("sample_size_train") else "every example"
    lines = ["## Data", "", f"- train: {train}, {sample}" + (f" ({examples} after pre-processing)" if examples else "")]
    for d in results.get("eval_sets", []):
        lines.append(f"- evaluation: `{d['name']}` ({d['source']}), {d['examples']} examples")
    per_subject = s.get("mmlu_per_subject")
    lines.append(f"- MMLU: {s.get('mmlu_k_shot')}-shot, "
                 + (f"{per_subject} questions per subject" if per_subject else "every question"))
    return lines + [""]


def _result_lines(results: dict, run: dict) -> list[str]:
    """EX (greedy and voted) per evaluation set and MMLU, before and after, with the paired test."""
    lines = ["## Results", "", "| | base model | fine-tuned |", "| --- | ---: | ---: |"]
    base_by_set, tuned_by_set = results["baseline"].get("ex_by_set") or {}, run.get("ex_by_set") or {}
    for d in results.get("eval_sets", []):
        before, after = base_by_set.get(d["name"]) or {}, tuned_by_set.get(d["name"]) or {}
        lines.append(f"| EX `{d['name']}`, greedy (n = {after.get('count', before.get('count', '-'))}) | "
                     f"{_pct(before.get('ex'))} | {_pct(after.get('ex'))} |")
        if before.get("voted") or after.get("voted"):
            voted = after.get("voted") or before.get("voted")
            lines.append(f"| EX `{d['name']}`, voted ({voted['n']} candidates) | "
                         f"{_pct((before.get('voted') or {}).get('ex'))} | "
                         f"{_pct((after.get('voted') or {}).get('ex'))} |")
    base_mmlu, tuned_mmlu = results["baseline"].get("mmlu") or {}, results.get("best_mmlu") or {}
    lines.append(f"| MMLU (n = {tuned_mmlu.get('count', base_mmlu.get('count', '-'))}) | "
                 f"{_pct(base_mmlu.get('accuracy'))} | {_pct(tuned_mmlu.get('accuracy'))} |")
    analysis = results.get("regression") or {}
    if analysis:
        lines += ["", f"MMLU, paired on the same questions: exact McNemar p = {analysis['mcnemar_p']:.3g}, "
                      f"{analysis.get('ci_level', 0.95):.0%} bootstrap interval of the change "
                      f"[{100 * analysis['ci_low']:+.1f}, {100 * analysis['ci_high']:+.1f}] points. "
                      f"{analysis.get('verdict', '')}"]
    return lines + ["", "EX: Spider execution accuracy (the answer's result equals the gold query's); voted: "
                        "execution-guided voting over sampled candidates and the greedy answer.", ""]


def _training_lines(name: str, run: dict) -> list[str]:
    """The training config of the run, and what its training did."""
    t = run.get("training") or {}
    done = f"{t['steps']} steps, loss {t['loss_start']:.3f} -> {t['loss_end']:.3f}" \
        if t.get("steps") and t.get("loss_start") is not None and t.get("loss_end") is not None else ""
    return ["## Training config", "", f"Run `{name}`" + (f": {done}" if done else "") + ".", "", "```json",
            json.dumps(run.get("config") or {}, indent=1, sort_keys=True), "```", ""]


def _usage_lines(sentencepiece: bool) -> list[str]:
    """How to use the folder, with or without this project."""
    tokenizer = ["The tokenizer is sentencepiece's tokenizer.model alone (as OpenLLaMA's): read it with the "
                 "sentencepiece package, as scripts/sentencepiece_tokenizer.py does; AutoTokenizer would convert it "
                 "into a fast tokenizer, which needs protobuf and which OpenLLaMA's authors advise against.",
                 ""] if sentencepiece else []
    return ["## Use", "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained(FOLDER)",
            "tokenizer = AutoTokenizer.from_pretrained(FOLDER)",
            "```", "",
            "Prompt it as it was trained (the instructions, the database's CREATE TABLE statements and the question; "
            "scripts/prompts.py `render`); `generation_config.json` decodes greedily and stops at the end of the "
            "answer. With this project: `python -m scripts.ask \"QUESTION\" --db DATABASE.sqlite --model FOLDER`. "
            "`adapter/` is the LoRA adapter alone, for a copy of the base model you already have (an adapter "
            "trained in 4-bit is best loaded on the base model in 4-bit NF4, as trained). The folder loads in any "
            "server that reads a Hugging Face model folder.", "", *tokenizer]
