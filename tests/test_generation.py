"""Greedy SQL generation: padded batches and continuous batching give the answers of a one-prompt-at-a-time loop."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from scripts.evaluate import generate
from scripts.prompts import render
from tests.tiny_models import build_tiny_model, build_tokenizer

SCHEMA = "CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER);"
QUESTIONS = ["How many singers are there?", "List the names of all singers from France ordered by age.",
             "What is the average age?", "Which countries do singers come from, and how many singers does each have?",
             "Oldest singer?"]


def prompts(tokenizer) -> list[str]:
    """Inference prompts of different lengths."""
    return [render(tokenizer, SCHEMA, q)[0] for q in QUESTIONS]


@pytest.mark.parametrize("adapter", [False, True])
def test_continuous_batching_answers_like_one_prompt_at_a_time(adapter):
    tokenizer = build_tokenizer("chatml")
    model = build_tiny_model(tokenizer, initializer_range=0.2).eval()
    if adapter:  # the EX stage of an adapter generates through PEFT's wrapper
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    texts = prompts(tokenizer)
    one_by_one = generate(model, tokenizer, texts, batch_size=1, max_new_tokens=12)
    assert len(set(one_by_one)) > 1  # the answers differ, so a mix-up of their order would show
    batches = []
    continuous = generate(model, tokenizer, texts, batch_size=3, max_new_tokens=12, continuous=True,
                          done=lambda indices, answers, seconds: batches.append(indices))
    assert continuous == one_by_one
    assert sorted(i for b in batches for i in b) == list(range(len(texts))) and len(batches) == 2
    assert generate(model, tokenizer, texts, batch_size=3, max_new_tokens=12) == one_by_one
