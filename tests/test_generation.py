"""Greedy SQL generation: batches answer like one prompt at a time; plain-format answers stop at the format's bounds."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LogitsProcessor, LogitsProcessorList

from scripts.evaluate import generate
from scripts.models import ensure_pad_token
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
def test_batches_answer_like_one_prompt_at_a_time(adapter):
    tokenizer = build_tokenizer("chatml")
    model = build_tiny_model(tokenizer, initializer_range=0.2).eval()
    if adapter:  # the EX stage of an adapter generates through PEFT's wrapper
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    texts = prompts(tokenizer)
    one_by_one = generate(model, tokenizer, texts, batch_size=1, max_new_tokens=12)
    assert len(set(one_by_one)) > 1  # the answers differ, so a mix-up of their order would show
    batches = []
    batched = generate(model, tokenizer, texts, batch_size=3, max_new_tokens=12,
                       done=lambda indices, answers, seconds: batches.append(indices))
    assert batched == one_by_one
    assert sorted(i for b in batches for i in b) == list(range(len(texts))) and len(batches) == 2


class ForceText(LogitsProcessor):
    """Makes row r of the batch write texts[r] token by token, then `filler` for ever; counts the decoding steps."""

    def __init__(self, tokenizer, texts: list[str], filler: str = " x"):
        self.rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        self.filler = tokenizer(filler, add_special_tokens=False)["input_ids"][-1]
        self.start, self.steps = None, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.start = input_ids.shape[1] if self.start is None else self.start
        step, self.steps = input_ids.shape[1] - self.start, self.steps + 1
        forced = torch.full_like(scores, -float("inf"))
        for row, ids in enumerate(self.rows):
            forced[row, ids[step] if step < len(ids) else self.filler] = 0.0
        return forced


def generate_forced(kind: str, answers: list[str], max_new_tokens: int = 60) -> tuple[list[str], int]:
    """What `generate` returns when the model is made to write `answers` (one per row of one batch), and its steps."""
    tokenizer = build_tokenizer(kind)
    ensure_pad_token(tokenizer)  # as the loader does for a base model
    model = build_tiny_model(tokenizer).eval()
    force = ForceText(tokenizer, answers)
    same_prompt = [render(tokenizer, SCHEMA, QUESTIONS[0])[0]] * len(answers)  # one batch, rows in this order
    texts = generate(model, tokenizer, same_prompt, batch_size=len(answers), max_new_tokens=max_new_tokens,
                     logits_processor=LogitsProcessorList([force]))
    return texts, force.steps


@pytest.mark.parametrize("continuation", ["\n\n### Question\nHow many concerts?", "\n### Question\nnext",
                                          "\nQuestion: How many concerts?", " ### SQL"])
def test_a_base_model_stops_where_the_plain_format_goes_on(continuation):
    query = "SELECT count(*) FROM singer WHERE age > 20"
    texts, steps = generate_forced("base", [query + continuation])
    assert texts == [query]
    assert steps < 30  # it stopped at the boundary, not at the 60-token cap


def test_each_answer_of_a_batch_stops_on_its_own():
    short, long = "SELECT count(*) FROM singer", "SELECT name , country , age FROM singer ORDER BY age DESC"
    texts, steps = generate_forced("base", [short + "\n\nQuestion: more", long + "\n\n### SQL"])
    assert texts == [short, long]
    assert steps < 40


def test_a_blank_line_before_any_content_does_not_stop_the_answer():
    texts, _ = generate_forced("base", ["\n\nSELECT count(*) FROM singer\n\nmore"])
    assert texts == ["\n\nSELECT count(*) FROM singer"]


def test_chat_templates_stop_at_their_end_of_turn_only():
    # a chat model's answer may hold a blank line (prose around a fenced query); only its end-of-turn token ends it
    answer = "Here it is:\n\nSELECT count(*) FROM singer"
    texts, steps = generate_forced("chatml", [answer], max_new_tokens=30)
    assert texts[0].startswith(answer) and len(texts[0]) > len(answer)
    assert steps == 30
