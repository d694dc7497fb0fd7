"""The export stage on a tiny run: a folder plain transformers loads, answering as the merged pipeline does; a rerun
that does nothing, a changed adapter exported again, an interrupted export that leaves no half folder, the card."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import scripts.distributed
import scripts.export
import scripts.models
from scripts.export import export_dir, export_stage, merge_precision
from scripts.models import ModelCache, load_for_evaluation
from scripts.prompts import render
from scripts.run_state import StageCache
from tests.tiny_export import RUN_NAME, export_tiny_run, save_tiny_adapter, tiny_run

SCHEMA = "CREATE TABLE book (book_id INTEGER PRIMARY KEY, title TEXT, pages INTEGER);"
QUESTIONS = ["How many books are there?", "What is the title of the longest book?", "List every title."]

PLAIN_GENERATE = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, prompts = sys.argv[1], json.loads(sys.argv[2])
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the pipeline's model is
    model = model.to(device)
    texts = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        out = model.generate(**enc)  # the folder's generation_config.json: greedy, the pipeline's stops and length
        texts.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    print(json.dumps({"texts": texts, "dtype": str(model.dtype), "modules": sorted(m for m in sys.modules
                      if m.split(".")[0] in ("scripts", "custom_metrics", "tests"))}))
""")


def stage(settings, results):
    """Run the export stage as main.run does."""
    return export_stage(settings, StageCache(settings.results_dir / "stages", force=settings.force),
                        ModelCache(settings), results)


def count_loads(monkeypatch) -> list:
    """Each load_for_evaluation call the export makes, by its eval_precision."""
    loads, real = [], scripts.models.load_for_evaluation

    def load(model_id, adapter, quantization, eval_precision, token=None):
        loads.append(eval_precision)
        return real(model_id, adapter, quantization, eval_precision, token=token)

    monkeypatch.setattr(scripts.models, "load_for_evaluation", load)
    return loads


def test_the_export_loads_with_plain_transformers_and_answers_as_the_merged_pipeline(tmp_path):
    from scripts.generation import generate, stop_token_ids

    settings, results, out = export_tiny_run(tmp_path)
    merged, tokenizer = load_for_evaluation(settings.base_model_id, results["best_adapter"], "none", "merged")
    prompts = [render(tokenizer, SCHEMA, q)[0] for q in QUESTIONS]
    pipeline = generate(merged, tokenizer, prompts, batch_size=1, max_new_tokens=settings.max_new_tokens)
    base, _ = load_for_evaluation(settings.base_model_id, None, "none", "merged")
    assert generate(base, tokenizer, prompts, batch_size=1, max_new_tokens=settings.max_new_tokens) != pipeline

    done = subprocess.run([sys.executable, "-c", PLAIN_GENERATE, str(out), json.dumps(prompts)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = json.loads(done.stdout.splitlines()[-1])
    assert plain["modules"] == [] and plain["dtype"] == str(merged.dtype)  # float32 on CPU, bf16 on most GPUs
    assert plain["texts"] == pipeline

    weights = load_file(out / "model.safetensors")
    assert weights.keys() == merged.state_dict().keys()
    assert all(torch.equal(weights[k], v.cpu()) for k, v in merged.state_dict().items())
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == stop_token_ids(tokenizer, merged) and generation["do_sample"] is False
    assert generation["max_new_tokens"] == settings.max_new_tokens
    assert (out / "chat_template.jinja").read_text() == tokenizer.chat_template
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "results" / RUN_NAME / "adapter" / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "text2sql.json").read_text())["schema_sample_rows"] == settings.schema_sample_rows
    assert sorted(p.name for p in out.parent.iterdir()) == ["export", RUN_NAME, "stages"]  # nothing left beside it


def test_a_rerun_exports_nothing_and_a_changed_adapter_is_exported_again(tmp_path, monkeypatch):
    settings, results, out = export_tiny_run(tmp_path)
    loads = count_loads(monkeypatch)
    weights, card = (out / "model.safetensors").read_bytes(), (out / "README.md").stat().st_mtime_ns

    saved = stage(settings, results)
    assert loads == [] and saved["folder"] == str(out) and (out / "README.md").stat().st_mtime_ns == card

    save_tiny_adapter(tmp_path / "results" / RUN_NAME / "adapter", tmp_path / "model", seed=2)  # retrained
    stage(settings, results)
    assert loads == ["merged"] and (out / "model.safetensors").read_bytes() != weights
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "results" / RUN_NAME / "adapter" / "adapter_model.safetensors").read_bytes()

    results["best_mmlu"]["accuracy"] = 1 / 3  # the card's figures changed (MMLU evaluated again)
    stage(settings, results)
    assert len(loads) == 2 and "| 30.0 % | 33.3 % |" in (out / "README.md").read_text()

    settings.force = True  # --force exports again
    stage(settings, results)
    assert len(loads) == 3


def test_an_interrupted_export_leaves_the_previous_folder_whole_and_the_next_run_finishes(tmp_path, monkeypatch):
    settings, results = tiny_run(tmp_path)
    out = export_dir(settings.results_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # the weights are written, the generation config is not
        m.setattr(scripts.export, "generation_config", interrupted)
        with pytest.raises(KeyboardInterrupt):
            stage(settings, results)
    assert not out.exists()  # no half folder where the export goes

    stage(settings, results)
    before = (out / "model.safetensors").read_bytes()
    save_tiny_adapter(tmp_path / "results" / RUN_NAME / "adapter", tmp_path / "model", seed=3)
    with monkeypatch.context() as m:
        m.setattr(scripts.export, "generation_config", interrupted)
        with pytest.raises(KeyboardInterrupt):
            stage(settings, results)
    assert (out / "model.safetensors").read_bytes() == before and (out / "generation_config.json").is_file()

    stage(settings, results)  # the changed adapter, exported; what the interruption left is gone
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in out.parent.iterdir()) == ["export", RUN_NAME, "stages"]


def test_the_model_card_holds_the_runs_figures(tmp_path):
    settings, results, out = export_tiny_run(tmp_path)
    card = (out / "README.md").read_text()
    assert f"merged into `{settings.base_model_id}`" in card and "plain LoRA" in card
    assert f"in {merge_precision(settings)[1]}. Exported" in card  # float32 on CPU
    assert "| EX `spider_dev`, greedy (n = 10) | 10.0 % | 60.0 % |" in card
    assert "| EX `spider_dev`, voted (4 candidates) | 20.0 % | 70.0 % |" in card
    assert "| MMLU (n = 9) | 30.0 % | 22.2 % |" in card
    assert "exact McNemar p = 0.625" in card and "[-33.3, +11.1] points" in card
    assert results["regression"]["verdict"] in card
    assert '"learning_rate": 0.01' in card and "3 steps, loss 2.250 -> 1.500" in card
    assert f"Exported {stage(settings, results)['date']}" in card
    assert "- evaluation: `spider_dev` (spider), 10 examples" in card and "train: Spider train, sample 12" in card


def test_only_the_main_process_exports_and_only_when_asked(tmp_path, monkeypatch, caplog):
    settings, results = tiny_run(tmp_path)
    loads = count_loads(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(scripts.distributed, "is_main", lambda: False)
        assert stage(settings, results) is None
    settings.stages = ("report",)
    assert stage(settings, results) is None
    settings.stages = ("export",)
    assert stage(settings, {**results, "best_adapter": None}) is None and "no trained adapter" in caplog.text
    assert loads == [] and not export_dir(settings.results_dir).exists()


def test_a_sentencepiece_tokenizer_is_exported_as_it_is_and_the_card_says_how_to_read_it(tmp_path):
    """OpenLLaMA's layout (tokenizer.model alone): the export keeps it, the project's loader reads it back as it read
    the base model's, and the card says how to read it without the project."""
    from transformers import AutoModelForCausalLM

    from scripts.models import load_model_and_tokenizer, load_tokenizer

    settings, _, out = export_tiny_run(tmp_path, sentencepiece=True)
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "model" / "tokenizer.model").read_bytes()
    assert not (out / "tokenizer.json").exists()
    assert "read it with the sentencepiece package" in (out / "README.md").read_text()
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    _, tokenizer = load_model_and_tokenizer(str(out), quantization="none")
    prompt = render(tokenizer, SCHEMA, QUESTIONS[0])[0]
    base = load_tokenizer(settings.base_model_id)
    assert type(tokenizer) is type(base) and tokenizer(prompt)["input_ids"] == base(prompt)["input_ids"]
