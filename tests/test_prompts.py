"""Prompt rendering for the three kinds of tokenizer: system role, rejected/moved system role, no template."""
import pytest

from scripts.prompts import INSTRUCTIONS, build_messages, end_of_turn, render, template_style
from tests.tiny_models import build_tokenizer

SCHEMA = "CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, age INTEGER);"
QUESTION = "How many singers are older than 30?"
ANSWER = "SELECT count(*) FROM singer WHERE age > 30"


def test_build_messages_has_system_user_and_optional_answer():
    messages = build_messages(SCHEMA, QUESTION, ANSWER)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert SCHEMA in messages[1]["content"] and QUESTION in messages[1]["content"]
    assert messages[2]["content"] == ANSWER
    assert [m["role"] for m in build_messages(SCHEMA, QUESTION)] == ["system", "user"]


@pytest.mark.parametrize(
    "kind, style, eot",
    [("chatml", "system", "<|im_end|>"), ("gemma", "folded", "<end_of_turn>"), ("mistral_v3", "folded", "</s>"),
     ("base", "plain", "</s>")],
)
def test_style_and_end_of_turn_found_by_rendering(kind, style, eot):
    tokenizer = build_tokenizer(kind)
    assert template_style(tokenizer) == style
    assert end_of_turn(tokenizer) == eot


@pytest.mark.parametrize("kind", ["chatml", "gemma", "mistral_v3", "base"])
def test_inference_prompt_is_the_training_prompt(kind):
    tokenizer = build_tokenizer(kind)
    prompt, completion = render(tokenizer, SCHEMA, QUESTION, ANSWER)
    inference_prompt, empty = render(tokenizer, SCHEMA, QUESTION)
    assert inference_prompt == prompt and empty == ""
    assert completion.startswith((ANSWER, " " + ANSWER))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    for text in (INSTRUCTIONS, SCHEMA, QUESTION):
        assert text in prompt


def test_system_role_template_keeps_instructions_as_system_message():
    tokenizer = build_tokenizer("chatml")
    prompt, completion = render(tokenizer, SCHEMA, QUESTION, ANSWER)
    assert prompt.startswith("<|im_start|>system\n" + INSTRUCTIONS + "<|im_end|>")
    assert "named Tiny" not in prompt  # our system message replaced the template's default one
    assert prompt.endswith("<|im_start|>assistant\n")
    assert completion == ANSWER + "<|im_end|>"  # one end of turn, no trailing newline


def test_rejecting_template_gets_instructions_in_the_user_turn():
    tokenizer = build_tokenizer("gemma")
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template(build_messages(SCHEMA, QUESTION), tokenize=False)
    prompt, completion = render(tokenizer, SCHEMA, QUESTION, ANSWER)
    assert prompt.startswith("<bos><start_of_turn>user\n" + INSTRUCTIONS + "\n\n### Schema")
    assert prompt.endswith("<start_of_turn>model\n")
    assert completion == ANSWER + "<end_of_turn>"


def test_template_that_drops_system_text_after_an_answer_is_folded():
    tokenizer = build_tokenizer("mistral_v3")
    full_with_system = tokenizer.apply_chat_template(build_messages(SCHEMA, QUESTION, ANSWER), tokenize=False)
    assert INSTRUCTIONS not in full_with_system  # what the detection must catch
    prompt, completion = render(tokenizer, SCHEMA, QUESTION, ANSWER)
    assert prompt.startswith("<s>[INST] " + INSTRUCTIONS) and prompt.endswith("[/INST]")
    assert completion == " " + ANSWER + "</s>"


def test_no_template_uses_plain_format_with_bos_and_eos():
    tokenizer = build_tokenizer("base")
    assert tokenizer.chat_template is None and tokenizer.pad_token is None
    prompt, completion = render(tokenizer, SCHEMA, QUESTION, ANSWER)
    assert prompt.startswith("<s>### Instructions\n" + INSTRUCTIONS)
    assert prompt.endswith(f"### Question\n{QUESTION}\n\n### SQL\n")
    assert completion == ANSWER + "</s>"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
