"""Tests for MMLU (scripts/mmlu*.py): CSV loading and errors, the harness prompt, log-likelihood scoring on tiny models."""
import csv
import functools
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from bench.bench_mmlu import harness_split
from scripts.errors import UserError
from scripts.mmlu import (
    build_prompt,
    encode_all_requests,
    encode_requests,
    evaluate_mmlu,
    mmlu_stage,
    split_on_oom,
    summarize_mmlu,
)
from scripts.mmlu_data import LETTERS, load_mmlu
from scripts.mmlu_scoring import HARNESS_DEFAULT_LENGTH, context_size, float32_head, score_continuations
from scripts.run_state import StageCache
from scripts.store import ResultsStore
from tests.tiny_models import build_tiny_model, build_tokenizer

SUBJECTS = ("college_physics", "high_school_geography")


def _question(i: int, subject: str) -> list[str]:
    """One CSV row; varied lengths so that batches need padding, and CSV quoting to parse."""
    words = " ".join(["word"] * (i % 7))
    return [f"  Q{i} of {subject}, with \"quotes\" and {words}?\n", f"alpha {i}", f"beta, {i}", "gamma", "delta", "ABCD"[i % 4]]


def _write_mmlu(root, n_test: int = 8, n_dev: int = 5) -> None:
    """A small MMLU folder in the original layout: dev/, val/, test/ with <subject>_<split>.csv."""
    for split, n in (("dev", n_dev), ("val", 2), ("test", n_test)):
        (root / split).mkdir(parents=True)
        for subject in SUBJECTS:
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(_question(i + (100 if split == "dev" else 0), subject) for i in range(n))


def _letter_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE where " A", " B", " C", " D" are single tokens; adds <s>, has no pad token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"Answer: {letter}\n{letter}. alpha beta gamma delta word" for letter in LETTERS] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def letter_setup():
    tokenizer = _letter_tokenizer()
    assert all(len(tokenizer(" " + x, add_special_tokens=False)["input_ids"]) == 1 for x in LETTERS)
    return build_tiny_model(tokenizer, seed=1).eval(), tokenizer


@pytest.fixture(scope="module")
def multi_token_setup():
    tokenizer = build_tokenizer("base")  # " A" is two tokens here: the full-continuation path
    assert len(tokenizer(" A", add_special_tokens=False)["input_ids"]) > 1
    return build_tiny_model(tokenizer, seed=2).eval(), tokenizer


@pytest.fixture
def mmlu_dir(tmp_path):
    _write_mmlu(tmp_path / "mmlu")
    return tmp_path / "mmlu"


# --- data -------------------------------------------------------------------------------------------------

def test_load_mmlu_reads_the_csv_layout(mmlu_dir):
    test = load_mmlu(mmlu_dir)
    assert len(test) == 16 and [q["subject"] for q in test] == [SUBJECTS[0]] * 8 + [SUBJECTS[1]] * 8
    first = test[0]
    assert first == {"subject": "college_physics", "index": 0, "question": '  Q0 of college_physics, with "quotes" and ?\n',
                     "choices": ["alpha 0", "beta, 0", "gamma", "delta"], "answer": "A"}
    assert [q["index"] for q in test[8:]] == list(range(8))
    assert len(load_mmlu(mmlu_dir, "dev")) == 10 and len(load_mmlu(mmlu_dir, "val")) == 4


def test_per_subject_sample_is_seeded_in_file_order_and_independent_of_other_subjects(mmlu_dir):
    sample = load_mmlu(mmlu_dir, per_subject=3, seed=7)
    assert sample == load_mmlu(mmlu_dir, per_subject=3, seed=7)
    for subject in SUBJECTS:
        indices = [q["index"] for q in sample if q["subject"] == subject]
        assert len(indices) == 3 and indices == sorted(indices)
    alone = load_mmlu(mmlu_dir, subjects=[SUBJECTS[1]], per_subject=3, seed=7)
    assert alone == [q for q in sample if q["subject"] == SUBJECTS[1]]
    seeds = {tuple(q["index"] for q in load_mmlu(mmlu_dir, per_subject=3, seed=s)) for s in range(6)}
    assert len(seeds) > 1  # the seed changes the sample
    assert len(load_mmlu(mmlu_dir, per_subject=50)) == 16  # a cap above the size keeps everything


def test_user_errors_name_the_file_and_line(tmp_path, mmlu_dir):
    with pytest.raises(UserError, match="PATH_MMLU: folder .*nowhere not found"):
        load_mmlu(tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown subjects \\['astrology'\\]"):
        load_mmlu(mmlu_dir, subjects=["astrology"])
    bad = mmlu_dir / "test" / "college_physics_test.csv"
    bad.write_text('"q1",a,b,c,d,A\n"q2, multi\nline",a,b,c,d,B\n"q3",a,b,c,E\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"{bad}:4: expected 6 columns"):
        load_mmlu(mmlu_dir)
    bad.write_text("q1,a,b,c,d,A\nq2,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{bad}:2: answer 'E' is not one of A, B, C, D"):
        load_mmlu(mmlu_dir)
    bad.write_bytes("q1,caf\u00e9,b,c,d,A\n".encode("latin-1"))  # not UTF-8
    with pytest.raises(UserError, match=f"{bad} is not UTF-8 text .* at byte 6\\); save it as UTF-8"):
        load_mmlu(mmlu_dir)
    (mmlu_dir / "dev").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="dev is missing"):
        load_mmlu(mmlu_dir, "dev")


def test_real_mmlu_counts(real_mmlu):
    test = load_mmlu(real_mmlu)
    assert len(test) == 14042 and len({q["subject"] for q in test}) == 57
    assert len(load_mmlu(real_mmlu, "dev")) == 285
    assert len(load_mmlu(real_mmlu, per_subject=10)) == 570


# --- prompt -----------------------------------------------------------------------------------------------

def test_prompt_is_the_harness_format(mmlu_dir):
    dev = load_mmlu(mmlu_dir, "dev", subjects=["high_school_geography"])
    question = load_mmlu(mmlu_dir, subjects=["high_school_geography"])[1]
    shot = dev[0]
    expected = (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        'Q100 of high_school_geography, with "quotes" and word word?\nA. alpha 100\nB. beta, 100\nC. gamma\nD. delta\n'
        "Answer: A\n\n"
        'Q1 of high_school_geography, with "quotes" and word?\nA. alpha 1\nB. beta, 1\nC. gamma\nD. delta\nAnswer:'
    )
    assert build_prompt(question, [shot]) == expected
    assert build_prompt(question, []) == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        'Q1 of high_school_geography, with "quotes" and word?\nA. alpha 1\nB. beta, 1\nC. gamma\nD. delta\nAnswer:'
    )


def test_dev_shots_are_the_first_k_and_never_the_question_itself(letter_setup, mmlu_dir, monkeypatch):
    import scripts.mmlu

    model, tokenizer = letter_setup
    dev = load_mmlu(mmlu_dir, "dev", subjects=[SUBJECTS[0]])
    seen = []
    monkeypatch.setattr(scripts.mmlu, "build_prompt",
                        lambda q, shots: seen.append([s["index"] for s in shots]) or build_prompt(q, shots))
    evaluate_mmlu(model, tokenizer, dev[:1] + load_mmlu(mmlu_dir, subjects=[SUBJECTS[0]])[:1], dev, k_shot=2)
    assert seen == [[1, 2], [0, 1]]  # dev question 0 gets dev 1 and 2; a test question gets dev 0 and 1


def test_missing_dev_subject_is_a_user_error(letter_setup, mmlu_dir):
    model, tokenizer = letter_setup
    dev = load_mmlu(mmlu_dir, "dev", subjects=[SUBJECTS[0]])
    with pytest.raises(UserError, match="no dev questions for subject 'high_school_geography'"):
        evaluate_mmlu(model, tokenizer, load_mmlu(mmlu_dir, subjects=[SUBJECTS[1]]), dev)


# --- scoring ----------------------------------------------------------------------------------------------

def _hand_loglikelihoods(model, tokenizer, prompt: str) -> list[float]:
    """Plain unbatched forward per letter: sum of log_softmax of the continuation tokens after the prompt."""
    context = tokenizer(prompt)["input_ids"]
    values = []
    for letter in LETTERS:
        whole = tokenizer(prompt + " " + letter)["input_ids"]
        assert whole[: len(context)] == context
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
        values.append(sum(logprobs[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
    return values


@pytest.mark.parametrize("setup", ["letter_setup", "multi_token_setup"])
def test_loglikelihoods_match_a_plain_forward(setup, request, mmlu_dir):
    model, tokenizer = request.getfixturevalue(setup)
    questions, dev = load_mmlu(mmlu_dir, per_subject=3, seed=1), load_mmlu(mmlu_dir, "dev")
    rows = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=2, batch_size=4)
    shots = {s: [d for d in dev if d["subject"] == s][:2] for s in SUBJECTS}
    for question, row in zip(questions, rows):
        expected = _hand_loglikelihoods(model, tokenizer, build_prompt(question, shots[question["subject"]]))
        assert row["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
        best = LETTERS[max(range(4), key=lambda j: expected[j])]
        assert (row["subject"], row["index"], row["prediction"]) == (question["subject"], question["index"], best)
        assert row["correct"] == (best == question["answer"]) and row["answer"] == question["answer"]


def test_single_token_shortcut_equals_full_continuation_scoring(letter_setup, mmlu_dir):
    model, tokenizer = letter_setup
    questions, dev = load_mmlu(mmlu_dir, per_subject=2), load_mmlu(mmlu_dir, "dev")
    rows = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=1)
    shots = {s: [d for d in dev if d["subject"] == s][:1] for s in SUBJECTS}
    for question, row in zip(questions, rows):
        context, continuations = encode_requests(tokenizer, build_prompt(question, shots[question["subject"]]))
        assert all(len(c) == 1 for c in continuations)
        full = score_continuations(model, [(context, c) for c in continuations], tokenizer)
        assert row["loglikelihoods"] == pytest.approx(full, abs=1e-4)


@pytest.mark.parametrize("setup", ["letter_setup", "multi_token_setup"])
def test_batching_with_left_padding_gives_the_one_by_one_answers(setup, request, mmlu_dir):
    model, tokenizer = request.getfixturevalue(setup)
    questions, dev = load_mmlu(mmlu_dir), load_mmlu(mmlu_dir, "dev")
    assert len({len(build_prompt(q, [])) for q in questions}) > 3  # prompts of different lengths: padding happens
    one_by_one = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=1, batch_size=1)
    batched = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=1, batch_size=8)
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in one_by_one]
    for a, b in zip(batched, one_by_one):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)


class ForwardSpy:
    """Wraps a model's forward: records (rows, tokens fed, whether a key/value cache came in) per call."""

    def __init__(self, model):
        self.model, self.inner, self.calls = model, model.forward, []

    def __enter__(self):
        @functools.wraps(self.inner)  # keeps the signature, which the scoring code inspects
        def forward(*args, **kwargs):
            ids = kwargs["input_ids"]
            self.calls.append((ids.shape[0], ids.numel(), kwargs.get("past_key_values") is not None))
            return self.inner(*args, **kwargs)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


def test_shared_prefix_gives_the_plain_scores_with_far_fewer_tokens(letter_setup, mmlu_dir):
    model, tokenizer = letter_setup
    questions, dev = load_mmlu(mmlu_dir, per_subject=6, seed=2), load_mmlu(mmlu_dir, "dev")
    with ForwardSpy(model) as plain_spy:
        plain = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=4, batch_size=4, share_prefix=False)
    with ForwardSpy(model) as shared_spy:
        shared = evaluate_mmlu(model, tokenizer, questions, dev, k_shot=4, batch_size=4)
    assert [r["prediction"] for r in shared] == [r["prediction"] for r in plain]
    for a, b in zip(shared, plain):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    prefix_runs = [c for c in shared_spy.calls if c[0] == 1 and not c[2]]
    assert len(prefix_runs) == len(SUBJECTS)  # header and shots go through the model once per subject
    assert all(c[2] for c in shared_spy.calls if c not in prefix_runs)  # every question batch starts from a cache
    assert sum(c[1] for c in shared_spy.calls) < 0.5 * sum(c[1] for c in plain_spy.calls)


def test_done_receives_every_row_once(letter_setup, mmlu_dir):
    model, tokenizer = letter_setup
    questions = load_mmlu(mmlu_dir)
    received = []
    rows = evaluate_mmlu(model, tokenizer, questions, load_mmlu(mmlu_dir, "dev"), k_shot=0, batch_size=5, done=received.extend)
    assert sorted((r["subject"], r["index"]) for r in received) == sorted((r["subject"], r["index"]) for r in rows)
    assert len(received) == 16


def _merging_tokenizer() -> PreTrainedTokenizerFast:
    """Character BPE without pre-tokenization whose merges fold ": A" into one token, as SentencePiece vocabularies can."""
    chars = sorted(set("Answer:BCD Q?xyz\n"))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({": ": len(vocab), ": A": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(":", " "), (": ", "A")]))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("make", [_merging_tokenizer, lambda: build_tokenizer("chatml")])
def test_batched_encoding_equals_the_harness_split_one_prompt_at_a_time(make):
    tokenizer = make()
    prompts = [f"Q{'x' * i}?\nAnswer:" for i in range(7)] + ["Q?\nAnswer: ", "Qyz?\nAnswer:\n"]
    expected = [harness_split(tokenizer, p) for p in prompts]  # the harness's rule, one prompt at a time
    assert encode_all_requests(tokenizer, prompts, chunk=4) == expected  # chunks of 4, 4 and 1
    assert [encode_requests(tokenizer, p) for p in prompts] == expected
    if make is _merging_tokenizer:  # ": A" is one token, so context + " A" does not start with the context
        context = tokenizer(prompts[0])["input_ids"]
        assert tokenizer(prompts[0] + " A")["input_ids"][: len(context)] != context


def test_long_prompts_are_cut_from_the_left(letter_setup, mmlu_dir):
    model, tokenizer = letter_setup
    question, dev = load_mmlu(mmlu_dir)[0], load_mmlu(mmlu_dir, "dev")
    row = evaluate_mmlu(model, tokenizer, [question], dev, k_shot=5, max_length=40)[0]
    context, continuations = encode_requests(tokenizer, build_prompt(question, dev[:5]))
    assert len(context) > 40
    cut = context[-39:]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([cut])).logits[0, -1].float(), dim=-1)
    assert row["loglikelihoods"] == pytest.approx([logprobs[c[0]].item() for c in continuations], abs=1e-4)


def _near_tie_bf16_model(tokenizer, seed: int = 3):
    """A bf16 tiny model whose four letter rows of the output head nearly coincide: in float32 their logits differ
    by a few thousandths, less than one bf16 step at their size (logits of several units)."""
    model = build_tiny_model(tokenizer, seed=seed)
    letters = [tokenizer(" " + x, add_special_tokens=False)["input_ids"][0] for x in LETTERS]
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
        for i in letters[1:]:
            model.lm_head.weight[i] = model.lm_head.weight[letters[0]] + 2e-3 * torch.randn(model.config.hidden_size)
    return model.to(torch.bfloat16).eval(), letters


@pytest.mark.parametrize("share_prefix,data", [(True, "mmlu_dir"), (False, "mmlu_dir"), (True, "real_mmlu")])
def test_bf16_model_scores_the_letters_in_float32(request, share_prefix, data):
    tokenizer = _letter_tokenizer()
    model, letters = _near_tie_bf16_model(tokenizer)
    folder = request.getfixturevalue(data)  # questions written by the test, or the real MMLU when present
    questions, dev = load_mmlu(folder, per_subject=4)[:12], load_mmlu(folder, "dev")
    heads_in: list[torch.Tensor] = []  # what the model fed its head: the reference computes from the same states
    hook = model.lm_head.register_forward_hook(lambda m, args, out: heads_in.append(args[0][:, -1].detach()))
    rows, states = [], []
    for question in questions:  # one at a time, so the head's last input is this question's
        rows += evaluate_mmlu(model, tokenizer, [question], dev, k_shot=2, share_prefix=share_prefix)
        states.append(heads_in[-1][0])
    hook.remove()
    reference = torch.log_softmax(torch.stack(states).double() @ model.lm_head.weight.double().T, dim=-1)[:, letters]
    plain_ties = 0
    for row, expected, state in zip(rows, reference.tolist(), states):
        assert row["loglikelihoods"] == pytest.approx(expected, abs=1e-5)
        assert row["prediction"] == LETTERS[max(range(4), key=lambda j: expected[j])]
        assert len(set(row["loglikelihoods"])) == 4  # no exact tie left to the first letter
        with torch.no_grad():  # what the model's own bf16 logits give
            bf16 = model.lm_head(state.clone()[None]).float()[0, letters].tolist()
        plain_ties += len(set(bf16)) < 4
    assert plain_ties >= len(rows) // 2  # without the float32 head most of these questions tie: the setup bites


def test_float32_head_leaves_the_model_as_it_was():
    tokenizer = _letter_tokenizer()
    model, _ = _near_tie_bf16_model(tokenizer)
    ids = torch.tensor([tokenizer("Answer:")["input_ids"]])
    before = model(ids).logits
    with float32_head(model):
        inside = model(ids).logits
    assert inside.dtype == torch.float32 and before.dtype == torch.bfloat16
    assert torch.equal(model(ids).logits, before) and model.lm_head.weight.dtype == torch.bfloat16


def test_context_size_is_found_as_the_harness_finds_it():
    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert context_size(model(n_positions=1024, max_position_embeddings=4096)) == 1024
    assert context_size(model(max_position_embeddings=4096)) == 4096
    assert context_size(model(n_ctx=512)) == 512
    nested = SimpleNamespace(get_text_config=lambda: SimpleNamespace(max_position_embeddings=8192))
    assert context_size(SimpleNamespace(config=nested)) == 8192
    assert context_size(model(), SimpleNamespace(model_max_length=3000)) == 3000
    assert context_size(model(), SimpleNamespace(model_max_length=int(1e30))) == HARNESS_DEFAULT_LENGTH == 2048
    assert context_size(model()) == 2048


def test_split_on_oom_halves_the_batch():
    calls = []

    def score(batch):
        calls.append(list(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [i * 10 for i in batch]

    assert split_on_oom(score, [1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]
    assert calls[0] == [1, 2, 3, 4, 5] and [1, 2] in calls


def test_summarize_mmlu_micro_and_macro():
    rows = [{"subject": "a", "correct": c} for c in (True, True, True, False)] + [{"subject": "b", "correct": False}]
    summary = summarize_mmlu(rows)
    assert summary["accuracy"] == pytest.approx(3 / 5) and summary["count"] == 5 and summary["correct"] == 3
    assert summary["macro_accuracy"] == pytest.approx((0.75 + 0.0) / 2)
    assert summary["by_subject"] == {"a": {"accuracy": 0.75, "correct": 3, "count": 4},
                                     "b": {"accuracy": 0.0, "correct": 0, "count": 1}}


# --- stage ------------------------------------------------------------------------------------------------

class _Models:
    """A stand-in for models.ModelCache that counts loads."""

    def __init__(self, loaded):
        self.loaded, self.calls = loaded, 0

    def get(self, adapter=None):
        self.calls += 1
        return self.loaded


def test_mmlu_stage_stores_answers_and_resumes_from_the_store(letter_setup, mmlu_dir, tmp_path):
    settings = SimpleNamespace(base_model_id="tiny", quantization="none", eval_precision="4bit", path_mmlu=mmlu_dir, mmlu_per_subject=4, seed=0, mmlu_k_shot=2,
                               eval_batch_size=4, stages=("baseline_mmlu",), db_path=tmp_path / "r.sqlite")
    cache = StageCache(tmp_path / "stages")
    models = _Models(letter_setup)
    with ResultsStore(tmp_path / "r.sqlite") as store:
        result = mmlu_stage("baseline_mmlu", settings, cache, store, models)
        stored = store.mmlu_rows(result["run_id"])
        assert len(stored) == result["count"] == 8 and models.calls == 1
        assert result["accuracy"] == pytest.approx(sum(r["correct"] for r in stored) / 8)
        assert [(r["subject"], r["index"], r["correct"]) for r in result["rows"]] == [
            (r["subject"], r["index"], r["correct"]) for r in stored]
        assert mmlu_stage("mmlu_best", settings, cache, store, models, adapter=None) is None
        cache.path("baseline_mmlu").unlink()  # lose the stage result: the store still has every answer
        again = mmlu_stage("baseline_mmlu", settings, cache, store, models)
        assert models.calls == 1  # nothing left to evaluate, so no model was loaded
        assert again["rows"] == result["rows"] and again["run_id"] == result["run_id"]
        assert len(store.mmlu_rows(result["run_id"])) == 8
