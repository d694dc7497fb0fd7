"""EVAL_BATCH_SIZE=auto: the memory estimate, the settings that take it, and generation and MMLU sized by it.

A GPU is pretended where needed: the model's device is said to be CUDA and its free memory is set, while the tiny
models run on the CPU.
"""
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import scripts.auto_batch as auto_batch_module
import scripts.generation as generation
from scripts import gpu_memory
from scripts.auto_batch import (AUTO, FIXED_SIZE, HEADROOM, MAX_PROMPTS, MAX_ROWS, AutoBatch, auto_batch,
                                decoding_bytes, model_shape, sorted_batches)
from scripts.cli import parse_args
from scripts.errors import UserError
from scripts.generation import generate, token_lengths
from scripts.mmlu import evaluate_mmlu
from scripts.mmlu_data import load_mmlu
from scripts.prompts import render
from scripts.settings import resolve_settings
from tests.test_generation import QUESTIONS, SCHEMA, ending_model, prompts
from tests.test_mmlu import ForwardSpy, letter_setup, mmlu_dir, multi_token_setup  # noqa: F401 - fixtures
from tests.test_settings import DEFAULTS, settings

GIB = 1024 ** 3
QWEN_05B = SimpleNamespace(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                           intermediate_size=4864, vocab_size=151936)  # Qwen2.5-Coder-0.5B-Instruct's config


def qwen_shape():
    """Qwen2.5-Coder-0.5B's shape in bf16."""
    return model_shape(SimpleNamespace(config=QWEN_05B, dtype=torch.bfloat16))


def pretend_gpu(monkeypatch, free: int) -> None:
    """Every model is on a CUDA device with `free` bytes free."""
    monkeypatch.setattr(auto_batch_module, "_cuda_device", lambda model: torch.device("cuda", 0))
    monkeypatch.setattr(gpu_memory, "free_bytes", lambda device=None: free)


def free_for(auto: AutoBatch, prompts: int, length: int) -> int:
    """The free memory whose budget fits exactly this many prompts of this length."""
    return math.ceil(auto.bytes_for(prompts, length) / (1 - HEADROOM)) + 64


# --- the estimate ----------------------------------------------------------------------------------------

def test_the_shape_comes_from_the_config_with_fallbacks():
    shape = qwen_shape()
    assert shape.kv_bytes == 12 * 1024  # "about 12 KiB per token for this model" (docs/RESULTS.md, section 25)
    assert (shape.head_dim, shape.dtype_bytes) == (64, 2)
    bare = model_shape(SimpleNamespace(config=SimpleNamespace(n_layer=4, n_embd=256, n_head=8, vocab_size=100)))
    assert (bare.kv_heads, bare.head_dim, bare.intermediate, bare.dtype_bytes) == (8, 32, 1024, 2)
    model, _ = ending_model()
    tiny = model_shape(model)
    assert (tiny.layers, tiny.kv_heads, tiny.head_dim, tiny.dtype_bytes) == (2, 2, 16, 4)
    assert model_shape(SimpleNamespace(config=SimpleNamespace(hidden_size=64))) is None


def test_the_estimate_scales_with_free_memory_prompt_length_and_candidates():
    shape = qwen_shape()
    at = lambda budget, candidates=1, length=500: AutoBatch(shape, budget, budget, 160, candidates).prompts_at(length)
    one = at(10 * GIB)
    assert 2 * one <= at(20 * GIB) <= 2 * one + 1  # twice the memory, twice the prompts
    assert at(10 * GIB, length=1000) < one * 0.6  # twice the length, about half the prompts
    assert at(10 * GIB, candidates=8) < one / 2  # each prompt decodes 8 rows
    assert at(1) == 1 and at(10_000 * GIB) == MAX_PROMPTS  # clamped to [1, MAX_PROMPTS]


def test_the_graph_decoders_caches_are_counted_at_their_rounded_size():
    shape = qwen_shape()
    rounded = decoding_bytes(shape, 5, 100, 28, static=True) - decoding_bytes(shape, 5, 100, 28)
    assert rounded == (8 - 5) * 128 * shape.kv_bytes  # 5 rows decode in a step of 8, 128 positions either way
    rounded = decoding_bytes(shape, 5, 100, 29, static=True) - decoding_bytes(shape, 5, 100, 29)
    assert rounded == (8 * 256 - 5 * 129) * shape.kv_bytes


def test_qwen_on_one_h200_gets_the_sizes_measured_fast_there():
    """docs/RESULTS.md, sections 23 and 25: greedy at 1024 prompts; voting over 8 candidates at 256 prompts (2048
    rows: 49.8 s, against 60.3 s at 1024 prompts, whose batch of 919 tokens peaked at 123 GiB)."""
    shape, free = qwen_shape(), 137 * GIB
    greedy = AutoBatch(shape, int(free * (1 - HEADROOM)), free, 160, 1, static=True)
    voting = AutoBatch(shape, int(free * (1 - HEADROOM)), free, 160, 8, static=True)
    assert greedy.prompts_at(919) == MAX_PROMPTS and voting.prompts_at(919) == MAX_ROWS // 8 == 256
    assert 118 * GIB < voting.bytes_for(1024, 919) < 130 * GIB  # the measured 123 GiB, the weights included
    on_24_gib = AutoBatch(shape, int(22 * GIB * (1 - HEADROOM)), 22 * GIB, 160, 8, static=True)
    assert 32 <= on_24_gib.prompts_at(919) < 256  # where memory, not the row cap, sets the size


def test_free_memory_counts_the_allocators_unused_cache_within_the_process_cap(monkeypatch):
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (50 * GIB, 100 * GIB))
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 30 * GIB)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 40 * GIB)
    monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=100 * GIB))
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    assert gpu_memory.free_bytes(torch.device("cuda", 0)) == 60 * GIB  # 50 free + 10 held unused
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None: 0.5, raising=False)
    assert gpu_memory.free_bytes(0) == 20 * GIB  # a 50 GiB cap, 30 of it allocated


def test_auto_on_a_gpu_reads_the_free_memory_and_logs_its_choice(monkeypatch, caplog):
    model, _ = ending_model()
    pretend_gpu(monkeypatch, 120 * GIB)
    auto = auto_batch(model, new_tokens=160, candidates=8, static=True)
    assert (auto.budget, auto.candidates, auto.static) == (int(120 * GIB * (1 - HEADROOM)), 8, True)
    with caplog.at_level(logging.INFO):
        AutoBatch(qwen_shape(), 100 * GIB, 120 * GIB, 160).log_choice(900, 100, 1034)
    assert "EVAL_BATCH_SIZE auto: " in caplog.text and "prompts per batch (free 120.0 GiB, ~0." in caplog.text


def test_auto_off_the_gpu_or_without_layer_sizes_is_a_fixed_size(monkeypatch, caplog):
    model, _ = ending_model()
    assert auto_batch(model).prompts_at(10_000) == FIXED_SIZE
    pretend_gpu(monkeypatch, 120 * GIB)
    shapeless = SimpleNamespace(config=SimpleNamespace(vocab_size=10), device=torch.device("cpu"))
    auto = auto_batch(shapeless)
    assert auto.budget is None and auto.prompts_at(10) == FIXED_SIZE and "no layer sizes" in auto.reason
    with caplog.at_level(logging.INFO):
        auto.log_choice(50, 10, 5)
    assert "EVAL_BATCH_SIZE auto: 5 prompts per batch (the model's config gives no layer sizes" in caplog.text


def test_batches_are_sized_by_their_longest_prompt():
    lengths = [10, 40, 20, 30, 10, 20]
    assert sorted_batches(range(6), lengths, 4) == [[1, 3, 2, 5], [0, 4]]
    assert sorted_batches(range(6), lengths, lambda length: 40 // length) == [[1], [3], [2, 5], [0, 4]]


# --- settings --------------------------------------------------------------------------------------------

def test_auto_is_taken_from_the_flag_the_env_file_and_the_constant(tmp_path: Path):
    assert settings(tmp_path, "--eval-batch-size", "auto").eval_batch_size == AUTO
    assert settings(tmp_path, "--eval-batch-size", "AUTO").eval_batch_size == AUTO
    assert settings(tmp_path, "--eval-batch-size", "32").eval_batch_size == 32
    assert settings(tmp_path, env_file="EVAL_BATCH_SIZE=auto\n").eval_batch_size == AUTO
    assert settings(tmp_path, environ={"EVAL_BATCH_SIZE": "Auto"}).eval_batch_size == AUTO
    env = tmp_path / ".env"
    env.write_text("")
    constant = resolve_settings({**DEFAULTS, "eval_batch_size": AUTO}, parse_args(["--env-file", str(env)]), {})
    assert constant.eval_batch_size == AUTO and constant.public()["eval_batch_size"] == AUTO


@pytest.mark.parametrize("value", ["autox", "0", "-1", "1.5"])
def test_a_bad_batch_size_is_a_one_line_error(tmp_path: Path, value: str):
    with pytest.raises(UserError, match=r"EVAL_BATCH_SIZE \(--eval-batch-size\) must be a positive integer or "
                                        f"'auto', got '?{value}'?$") as flag:
        settings(tmp_path, "--eval-batch-size", value)
    with pytest.raises(UserError, match=f"EVAL_BATCH_SIZE in .* is '{value}', not a positive integer or 'auto'") as env:
        settings(tmp_path, env_file=f"EVAL_BATCH_SIZE={value}\n")
    env_file = tmp_path / ".env"
    env_file.write_text("")
    with pytest.raises(UserError, match="EVAL_BATCH_SIZE .* must be a positive integer or 'auto'") as constant:
        resolve_settings({**DEFAULTS, "eval_batch_size": value}, parse_args(["--env-file", str(env_file)]), {})
    assert all("\n" not in str(e.value) for e in (flag, env, constant))


# --- generation and MMLU ----------------------------------------------------------------------------------

def test_auto_on_the_cpu_answers_like_a_fixed_batch_size(caplog):
    model, tokenizer = ending_model()
    texts = prompts(tokenizer)
    fixed = generate(model, tokenizer, texts, batch_size=2, max_new_tokens=16)
    with caplog.at_level(logging.INFO):
        assert generate(model, tokenizer, texts, batch_size=AUTO, max_new_tokens=16) == fixed
    assert "EVAL_BATCH_SIZE auto: 5 prompts per batch (on the CPU: a fixed size" in caplog.text


@pytest.mark.parametrize("decoder", ["graph", "prune"])
def test_auto_on_a_gpu_gives_long_batches_fewer_prompts_and_the_same_answers(monkeypatch, caplog, decoder):
    model, tokenizer = ending_model()
    texts = [render(tokenizer, SCHEMA * 3, q)[0] for q in QUESTIONS[:2]] + prompts(tokenizer) * 2  # 2 long, 10 short
    fixed = generate(model, tokenizer, texts, batch_size=4, max_new_tokens=16, decoder=decoder)
    lengths = token_lengths(texts, tokenizer)
    estimate = AutoBatch(model_shape(model), 0, 0, 16, static=decoder == "graph")
    pretend_gpu(monkeypatch, free_for(estimate, 2, max(lengths)))
    batches = []
    with caplog.at_level(logging.INFO):
        auto = generate(model, tokenizer, texts, batch_size=AUTO, max_new_tokens=16, decoder=decoder,
                        done=lambda indices, answers, seconds: batches.append(indices))
    assert auto == fixed
    sizes = [len(b) for b in batches]
    assert sizes[0] == 2 and max(sizes) > 2 and sum(sizes) == len(texts)  # shorter prompts, larger batches
    assert "EVAL_BATCH_SIZE auto: 2-" in caplog.text


def test_an_out_of_memory_split_under_auto_is_remembered_as_a_share(monkeypatch, caplog):
    """The GPU holds half of what the estimate says at every length: the first batch splits, the later ones start
    at the share that fitted and never run out of memory."""
    model, tokenizer = ending_model()
    texts = prompts(tokenizer) * 4
    expected = generate(model, tokenizer, texts, batch_size=4, max_new_tokens=8)
    lengths = token_lengths(texts, tokenizer)
    estimate = AutoBatch(model_shape(model), 0, 0, 8, static=True)
    free = free_for(estimate, 4, max(lengths))
    pretend_gpu(monkeypatch, free)
    planned = auto_batch(model, 8, static=True)
    real, attempts = generation._generate_pruned, []

    def half_the_gpu(model, tokenizer, batch, *args, **kwargs):
        longest = max(token_lengths(batch, tokenizer))
        fits = len(batch) <= max(1, planned.prompts_at(longest) // 2)
        attempts.append(fits)
        if not fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(generation, "_generate_pruned", half_the_gpu)
    with caplog.at_level(logging.INFO):
        assert generate(model, tokenizer, texts, batch_size=AUTO, max_new_tokens=8) == expected
    assert attempts[0] is False and attempts.count(False) == 1  # one failure, in the first batch only
    assert "generating in parts of 1/2 of each estimated batch size" in caplog.text


def test_mmlu_under_auto_scores_like_a_fixed_batch_size(letter_setup, mmlu_dir, monkeypatch):  # noqa: F811
    model, tokenizer = letter_setup
    questions, dev = load_mmlu(mmlu_dir), load_mmlu(mmlu_dir, "dev")
    fixed = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=1, batch_size=4, share_prefix=False)
    on_cpu = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=1, batch_size=AUTO, share_prefix=False)
    for a, b in zip(on_cpu, fixed):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    with ForwardSpy(model) as one_by_one:
        evaluate_mmlu(model, tokenizer, questions, dev, k_shot=1, batch_size=1, share_prefix=False)
    longest = max(tokens // rows for rows, tokens, _ in one_by_one.calls)
    pretend_gpu(monkeypatch, free_for(AutoBatch(model_shape(model)), 3, longest))
    with ForwardSpy(model) as spy:
        on_gpu = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=1, batch_size=AUTO, share_prefix=False)
    assert [r["prediction"] for r in on_gpu] == [r["prediction"] for r in fixed]
    for a, b in zip(on_gpu, fixed):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    estimate = auto_batch(model)
    assert spy.calls[0][0] == 3 and len(spy.calls) >= len(questions) / 4  # the longest first, 3 of them
    assert all(rows <= estimate.prompts_at(tokens // rows) for rows, tokens, _ in spy.calls)


def test_mmlu_questions_scored_in_full_take_a_quarter_of_the_auto_size(multi_token_setup, mmlu_dir,  # noqa: F811
                                                                      monkeypatch):
    model, tokenizer = multi_token_setup
    questions, dev = load_mmlu(mmlu_dir), load_mmlu(mmlu_dir, "dev")
    fixed = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=1, batch_size=8)
    pretend_gpu(monkeypatch, 10 * GIB)  # every question fits: one batch of 4 rows per question
    with ForwardSpy(model) as spy:
        auto = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=1, batch_size=AUTO)
    assert [r["prediction"] for r in auto] == [r["prediction"] for r in fixed]
    assert spy.calls[0][0] == len(questions) * 4
