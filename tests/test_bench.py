"""The training benchmark compares its variants on the same examples, and --only keeps the reference."""
from bench.bench_training import LEVERS, REFERENCE, selected_levers, steps_for_same_examples
from scripts.settings import QUANTIZATIONS
from scripts.training_config import validate_training_configs


def test_every_lever_sees_the_reference_number_of_examples():
    for name, lever in LEVERS.items():
        config = {**REFERENCE, **lever}
        steps = steps_for_same_examples(30, config)
        per_step = config["per_device_train_batch_size"] * config["gradient_accumulation_steps"]
        assert steps * per_step == 30 * 16, name


def test_every_lever_is_a_valid_training_config():
    for name, lever in LEVERS.items():
        config = {**REFERENCE, **lever}
        assert config.pop("quantization", "4bit") in QUANTIZATIONS, name
        validate_training_configs([config])


def test_only_selects_matching_levers_and_always_the_reference():
    chosen = list(selected_levers("batch 8,packing"))
    assert chosen[0] == next(iter(LEVERS))
    assert chosen[1:] == [n for n in LEVERS if "batch 8" in n or "packing" in n]
    assert list(selected_levers("")) == list(LEVERS)


def test_seed_layouts_have_the_real_models_sizes():
    """Built on the meta device (no memory): the parameter counts of open_llama_3b_v2 and Mistral-7B-v0.3."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.seed_models import model_config

    counts = {}
    for name in ("open_llama_3b", "mistral_7b"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(name))
        counts[name] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
    assert counts == {"open_llama_3b": 3.43, "mistral_7b": 7.25}
    mistral = model_config("mistral_7b")
    assert (mistral.num_key_value_heads, mistral.rope_parameters["rope_theta"], mistral.sliding_window) == (8, 1e6, None)


def test_seed_models_and_capped_run_smoke(tmp_path, monkeypatch):
    """--tiny seeds load through the pipeline's loader; capped_run records a short run's stages and batch."""
    import json

    import sentencepiece

    from bench import capped_run, seed_models
    from scripts.demo_data import build_demo_data
    from scripts.models import load_tokenizer
    from scripts.prompts import template_style
    from scripts.settings import ENV_KEYS
    from tests.test_gpu_memory import argv

    llama = seed_models.seed_model("open_llama_3b", tmp_path / "open_llama", tiny=True)
    mistral = seed_models.seed_model("mistral_7b", tmp_path / "mistral", tiny=True)
    assert (llama["tokenizer"], llama["vocab_size"]) == ("SentencePieceTokenizer", 32000)
    assert not (tmp_path / "open_llama" / "tokenizer.json").exists()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "open_llama" / "tokenizer.model"))
    tokenizer = load_tokenizer(str(tmp_path / "open_llama"))
    assert sp.get_piece_size() == 32000 and tokenizer("SELECT name FROM singer")["input_ids"] == [1] + sp.encode(
        "SELECT name FROM singer")
    assert mistral["vocab_size"] == 32768 and len(load_tokenizer(str(tmp_path / "mistral"))) == 32768
    assert template_style(load_tokenizer(str(tmp_path / "mistral"))) == "folded"  # [INST]: no system role kept

    spider_zip, mmlu = build_demo_data(tmp_path / "demo")
    inputs = {"model": tmp_path / "mistral", "zip": spider_zip, "mmlu": mmlu}
    monkeypatch.chdir(tmp_path)
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "capped.json"
    status = capped_run.main(["--gpu-gb", "16", "--out", str(out), "--",
                              *argv(tmp_path, inputs, "data,baseline_ex,preprocess,train")])
    record = json.loads(out.read_text())
    assert status == 0 == record["exit_status"] and not record["errors"]
    ran = {s["stage"]: s for s in record["stages"]}
    assert {"data", "baseline_ex", "preprocess", "train"} <= set(ran) and ran["train"]["seconds"] > 0
    (run,) = record["training_runs"].values()
    assert (run["per_device_train_batch_size"], run["gradient_accumulation_steps"], run["oom_retries"]) == (2, 1, 0)


def test_generation_bench_scores_each_answer_with_the_pipelines_extraction_and_metric(tmp_path):
    from bench.bench_generation import correct_flags
    from scripts.spider_release import prepare_spider
    from tests.test_spider_data import make_spider_folder

    layout = prepare_spider(make_spider_folder(tmp_path / "spider"), tmp_path / "unused")
    dev = [{"question": "q", "query": "SELECT name FROM singer", "db_id": "concert"}] * 3
    texts = ["```sql\nSELECT name FROM singer\n```", "SELECT age FROM singer", "I cannot answer that."]
    assert correct_flags(texts, dev, layout) == [True, False, False]


def test_warm_up_generates_until_its_seconds_have_passed(monkeypatch):
    import bench
    import scripts.generation

    clock, calls = iter(range(100)), []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(scripts.generation, "generate", lambda model, tokenizer, prompts, **kw: calls.append(prompts))
    prompts = [f"p{i}" for i in range(20)]
    assert bench.warm_up(None, None, prompts, seconds=3) == 3  # passes end at t=1, 2, 3
    assert calls == [prompts[:16]] * 3
    assert bench.warm_up(None, None, prompts, seconds=0) == 1  # at least one pass


def test_the_kernel_table_names_the_ops_of_one_batch():
    from bench.profile_generation import kernel_table
    from tests.test_generation import ending_model, prompts

    model, tokenizer = ending_model()
    table = kernel_table(model, tokenizer, prompts(tokenizer), 2, 4, "prune", "roomy", rows=5)
    assert "aten::" in table and "Self CPU" in table
    assert len([line for line in table.splitlines() if "aten::" in line]) == 5
