"""The one prompt function: a Spider example -> chat messages -> (prompt, completion) text, for training and inference.

How the instructions are placed is found by RENDERING the tokenizer's chat template, never from the model's name:
- "system": the template keeps a system message at the start of both the prompt and the full conversation;
- "folded": the template rejects the system role (raises) or moves/drops its text once an answer follows
  (e.g. Mistral v0.3 puts it in the last user turn only), so the instructions open the first user turn instead;
- "plain":  no chat template (a base model), or a template that renders the prompt differently alone than
  followed by an answer: the documented plain format below, with the tokenizer's bos in front when it adds one.

Plain format:
    ### Instructions\\n<INSTRUCTIONS>\\n\\n### Schema\\n<schema>\\n\\n### Question\\n<question>\\n\\n### SQL\\n<answer><eos>

The prompt is exactly the text the model sees at inference (tokenize it with add_special_tokens=False);
the completion is the answer followed by the template's end of turn (trailing whitespace dropped) or eos.
A base model rarely writes eos before it is fine-tuned: in the plain format an answer also ends where the format
would go on (PLAIN_STOPS: a blank line, a new `###` section, a new `Question:`), which the training text never
holds inside an answer (answers are one stripped query followed by eos).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "You are an expert in SQLite. Given the database schema, write one SQLite query that answers the question. "
    "Reply with the SQL query only."
)
STYLES = ("system", "folded", "plain")
PLAIN_STOPS = ("\n\n", "###", "\nQuestion:")
_PROBE_ANSWER = "SELECT 1 FROM probe"
_style_cache: dict[tuple, str] = {}


def user_text(schema: str, question: str) -> str:
    """The user turn: the database schema, then the question."""
    return f"### Schema\n{schema.strip()}\n\n### Question\n{question.strip()}"


def build_messages(schema: str, question: str, answer: str | None = None) -> list[dict]:
    """System instructions, the user turn (schema + question) and, for training, the gold SQL as the assistant turn."""
    messages = [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": user_text(schema, question)},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer.strip()})
    return messages


def fold_system(messages: list[dict]) -> list[dict]:
    """The same conversation with the system text moved to the start of the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def plain_prompt(tokenizer, schema: str, question: str) -> str:
    """The plain (no template) prompt, led by bos when the tokenizer would add it itself."""
    body = f"### Instructions\n{INSTRUCTIONS}\n\n{user_text(schema, question)}\n\n### SQL\n"
    return (tokenizer.bos_token or "") + body if adds_bos(tokenizer) else body


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts bos in front of a plain encoded text (Llama-style base tokenizers do)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def template_style(tokenizer) -> str:
    """'system', 'folded' or 'plain', found by rendering a probe conversation (cached per template)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "plain"
    key = (template if isinstance(template, str) else repr(template), tokenizer.bos_token, tokenizer.eos_token)
    if key not in _style_cache:
        _style_cache[key] = _detect_style(tokenizer)
        log.info("prompt style for this chat template: %s", _style_cache[key])
    return _style_cache[key]


def _detect_style(tokenizer) -> str:
    """Try the system role first, then folded instructions; plain when neither renders consistently."""
    messages = build_messages("CREATE TABLE t (a INTEGER);", "How many?", _PROBE_ANSWER)
    for style, probe in (("system", messages), ("folded", fold_system(messages))):
        rendered = _try_render(tokenizer, probe)
        if rendered and _consistent(*rendered):
            return style
    log.warning(
        "the chat template neither keeps a system message nor renders the prompt as a prefix of the full "
        "conversation; using the plain '### Instructions ... ### SQL' format instead"
    )
    return "plain"


def _try_render(tokenizer, messages: list[dict]) -> tuple[str, str] | None:
    """(generation prompt, full conversation) as the template renders them, or None if it raises."""
    try:
        prompt = _apply(tokenizer, messages[:-1], add_generation_prompt=True)
        full = _apply(tokenizer, messages, add_generation_prompt=False)
    except Exception as e:  # jinja's raise_exception (TemplateError) and friends: this style is not supported
        log.debug("chat template rejected the probe conversation: %s", e)
        return None
    return prompt, full


def _consistent(prompt: str, full: str) -> bool:
    """The full conversation starts with the prompt, both hold the instructions, and the answer follows."""
    return full.startswith(prompt) and INSTRUCTIONS in prompt and _PROBE_ANSWER in full[len(prompt):]


def _apply(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """The template's text for these messages (no tokenization)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render(tokenizer, schema: str, question: str, answer: str | None = None) -> tuple[str, str]:
    """(prompt, completion): the prompt is exactly what the model sees at inference; completion = answer + end of turn."""
    style = template_style(tokenizer)
    if style == "plain":
        prompt = plain_prompt(tokenizer, schema, question)
        return prompt, ("" if answer is None else answer.strip() + (tokenizer.eos_token or ""))
    messages = build_messages(schema, question, answer)
    if style == "folded":
        messages = fold_system(messages)
    if answer is None:
        return _apply(tokenizer, messages, add_generation_prompt=True), ""
    prompt = _apply(tokenizer, messages[:-1], add_generation_prompt=True)
    full = _apply(tokenizer, messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError(f"chat template rendered the prompt differently once an answer follows: {prompt!r} vs {full!r}")
    # the answer through its end-of-turn marker; the newline some templates add after the marker is not trained on
    return prompt, full[len(prompt):].rstrip()


def stop_strings(tokenizer) -> tuple[str, ...]:
    """Texts that end an answer besides the stop tokens: the plain format's boundaries, none for chat templates."""
    return PLAIN_STOPS if template_style(tokenizer) == "plain" else ()


def end_of_turn(tokenizer) -> str:
    """What the template puts after the assistant content (eos for the plain format)."""
    _, completion = render(tokenizer, "", "q", answer=_PROBE_ANSWER)
    return completion.split(_PROBE_ANSWER, 1)[-1]
