"""Generation: every decoder and batch size answer like one prompt at a time; stops; sampling."""
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LogitsProcessor, LogitsProcessorList

from scripts.generation import (DECODERS, RoomyLayer, Sampling, StaticStep, StepGraphs, generate, make_room,
                                sample_tokens)
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


def ending_model(kind: str = "chatml", adapter: bool = False, arch: str = "llama", **config):
    """A tiny model whose greedy answers end at different steps (eos made likely after a few tokens), and its
    tokenizer; with `adapter`, wrapped in a random PEFT LoRA as the EX stage of an adapter is."""
    tokenizer = build_tokenizer(kind)
    ensure_pad_token(tokenizer)
    model = build_tiny_model(tokenizer, arch=arch, initializer_range=0.2, **config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 3  # some answers end early, others run to the cap
    if adapter:
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    return model, tokenizer


@pytest.mark.parametrize("adapter,arch,attention", [(False, "llama", "sdpa"), (True, "llama", "sdpa"),
                                                    (False, "mistral", "sdpa"), (False, "llama", "eager"),
                                                    (True, "llama", "eager")])
def test_every_decoder_answers_like_one_prompt_at_a_time(adapter, arch, attention):
    """Under sdpa and eager attention alike (eager adds the mask to its scores: the static steps' mask is additive)."""
    model, tokenizer = ending_model(adapter=adapter, arch=arch, attn_implementation=attention)
    assert model.config._attn_implementation == attention
    texts = prompts(tokenizer)
    one_by_one = generate(model, tokenizer, texts, batch_size=1, max_new_tokens=16, decoder="hf")
    assert len(set(one_by_one)) > 1  # the answers differ, so a mix-up of their order would show
    lengths = {len(tokenizer(t)["input_ids"]) for t in one_by_one}
    assert len(lengths) > 1  # and they end at different steps, so rows leave the pruned batch at different times
    for decoder in DECODERS:
        batches = []
        batched = generate(model, tokenizer, texts, batch_size=3, max_new_tokens=16, decoder=decoder,
                           done=lambda indices, answers, seconds: batches.append(indices))
        assert batched == one_by_one, decoder
        assert sorted(i for b in batches for i in b) == list(range(len(texts))) and len(batches) == 2
    assert generate(model, tokenizer, texts, batch_size=1, max_new_tokens=16, decoder="prune") == one_by_one


def test_sampling_gives_n_seeded_answers_per_prompt():
    model, tokenizer = ending_model()
    texts = prompts(tokenizer)[:3]
    sampling = Sampling(n=4, temperature=1.0, top_p=0.9, seed=1)
    for decoder in DECODERS:
        first = generate(model, tokenizer, texts, batch_size=2, max_new_tokens=10, sampling=sampling,
                         decoder=decoder)
        assert [len(c) for c in first] == [4, 4, 4] and all(isinstance(a, str) for c in first for a in c)
        assert len({a for c in first for a in c}) > 3  # sampled, not four copies of the greedy answer
        again = generate(model, tokenizer, texts, batch_size=2, max_new_tokens=10, sampling=sampling,
                         decoder=decoder)
        assert again == first  # seeded: a resumed run samples the same candidates
    other = generate(model, tokenizer, texts, batch_size=2, max_new_tokens=10, sampling=Sampling(4, 1.0, 0.9, 2))
    assert other != first


def test_an_out_of_memory_batch_is_split_in_halves(monkeypatch):
    import scripts.generation as generation

    model, tokenizer = ending_model()
    texts = prompts(tokenizer)
    expected = generate(model, tokenizer, texts, batch_size=4, max_new_tokens=8)
    real, sizes = generation._generate_pruned, []

    def small_gpu(model, tokenizer, batch, *args, **kwargs):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(generation, "_generate_pruned", small_gpu)
    assert generate(model, tokenizer, texts, batch_size=4, max_new_tokens=8) == expected
    assert sizes[:3] == [4, 2, 1] and max(sizes[3:]) <= 2


def test_after_a_split_later_batches_start_at_the_size_that_fitted(monkeypatch):
    import scripts.generation as generation

    model, tokenizer = ending_model()
    texts = prompts(tokenizer) * 2  # batches of 4, 4 and 2
    expected = generate(model, tokenizer, texts, batch_size=4, max_new_tokens=8)
    real, sizes = generation._generate_pruned, []

    def small_gpu(model, tokenizer, batch, *args, **kwargs):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(generation, "_generate_pruned", small_gpu)
    assert generate(model, tokenizer, texts, batch_size=4, max_new_tokens=8) == expected
    assert sizes == [4, 2, 2, 2, 2, 2]  # one batch ran out of memory; the others were never tried at 4


def test_the_static_steps_of_one_length_share_the_largest_ones_caches():
    model, tokenizer = ending_model()
    layers = model(**tokenizer(["a b c"], return_tensors="pt"), use_cache=True).past_key_values.layers
    graphs = StepGraphs(model)
    large, small = graphs.step(8, 100, layers), graphs.step(2, 100, layers)
    assert small.layers[0].keys.data_ptr() == large.layers[0].keys.data_ptr()
    assert small.layers[0].keys.shape[0] == 2 and large.layers[0].keys.shape[0] == 8
    larger = graphs.step(16, 100, layers)  # a batch larger than every kept step starts them anew
    assert graphs.steps == {16: larger}


def test_out_of_memory_beside_kept_static_steps_frees_them_before_splitting(monkeypatch):
    import scripts.generation as generation

    model, tokenizer = ending_model()
    texts = prompts(tokenizer)[:3] + prompts(tokenizer)[4:]  # two batches of one cache length: the second uses the
    expected = generate(model, tokenizer, texts, batch_size=2, max_new_tokens=8, decoder="prune")  # first's steps
    real, calls = generation._prefill, []

    def tight_gpu(model, tokenizer, batch, *args, **kwargs):
        calls.append(len(batch))
        if len(calls) == 2:  # the second batch's first attempt, while the first batch's steps are kept
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(generation, "_prefill", tight_gpu)
    cleared = []
    real_clear = generation.StepGraphs.clear
    monkeypatch.setattr(generation.StepGraphs, "clear", lambda self: (cleared.append((len(calls), len(self.steps))),
                                                                       real_clear(self)))
    assert generate(model, tokenizer, texts, batch_size=2, max_new_tokens=8, decoder="graph") == expected
    assert calls[:3] == [2, 2, 2]  # tried again whole, not split in halves
    assert any(call == 2 and steps > 0 for call, steps in cleared)  # the kept steps were freed after the error


class ForceText(LogitsProcessor):
    """Makes row r of the batch write texts[r] token by token, then `filler` for ever; counts the decoding steps."""

    def __init__(self, tokenizer, texts: list[str], filler: str = " x"):
        self.rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        self.filler = tokenizer(filler, add_special_tokens=False)["input_ids"][-1]
        self.steps = 0

    def __call__(self, input_ids, scores: torch.FloatTensor) -> torch.FloatTensor:
        step, self.steps = self.steps, self.steps + 1
        forced = torch.full_like(scores, -float("inf"))
        for row, ids in enumerate(self.rows):
            forced[row, ids[step] if step < len(ids) else self.filler] = 0.0
        return forced


def generate_forced(kind: str, answers: list[str], max_new_tokens: int = 60, decoder: str = "hf"
                    ) -> tuple[list[str], int]:
    """What `generate` returns when the model is made to write `answers` (one per row of one batch), and its steps.

    The pruned decoder calls the model itself, so there its forward is wrapped (one row only: rows that leave the
    batch would shift the others)."""
    tokenizer = build_tokenizer(kind)
    ensure_pad_token(tokenizer)  # as the loader does for a base model
    model = build_tiny_model(tokenizer).eval()
    force = ForceText(tokenizer, answers)
    same_prompt = [render(tokenizer, SCHEMA, QUESTIONS[0])[0]] * len(answers)  # one batch, rows in this order
    extra = {"logits_processor": LogitsProcessorList([force])} if decoder == "hf" else {}
    if decoder == "prune":
        assert len(answers) == 1
        real_forward = model.forward

        def forced_forward(*args, **kwargs):
            out = real_forward(*args, **kwargs)
            out.logits[:, -1] = force(None, out.logits[:, -1])
            return out

        model.forward = forced_forward
    texts = generate(model, tokenizer, same_prompt, batch_size=len(answers), max_new_tokens=max_new_tokens,
                     decoder=decoder, **extra)
    return texts, force.steps


@pytest.mark.parametrize("decoder", ["prune", "hf"])
@pytest.mark.parametrize("continuation", ["\n\n### Question\nHow many concerts?", "\n### Question\nnext",
                                          "\nQuestion: How many concerts?", " ### SQL"])
def test_a_base_model_stops_where_the_plain_format_goes_on(continuation, decoder):
    query = "SELECT count(*) FROM singer WHERE age > 20"
    texts, steps = generate_forced("base", [query + continuation], decoder=decoder)
    assert texts == [query]
    assert steps < 30  # it stopped at the boundary, not at the 60-token cap


def test_each_answer_of_a_batch_stops_on_its_own():
    short, long = "SELECT count(*) FROM singer", "SELECT name , country , age FROM singer ORDER BY age DESC"
    texts, steps = generate_forced("base", [short + "\n\nQuestion: more", long + "\n\n### SQL"])
    assert texts == [short, long]
    assert steps < 40


@pytest.mark.parametrize("decoder", ["prune", "hf"])
def test_a_blank_line_before_any_content_does_not_stop_the_answer(decoder):
    texts, _ = generate_forced("base", ["\n\nSELECT count(*) FROM singer\n\nmore"], decoder=decoder)
    assert texts == ["\n\nSELECT count(*) FROM singer"]


@pytest.mark.parametrize("decoder", ["prune", "hf"])
def test_chat_templates_stop_at_their_end_of_turn_only(decoder):
    # a chat model's answer may hold a blank line (prose around a fenced query); only its end-of-turn token ends it
    answer = "Here it is:\n\nSELECT count(*) FROM singer"
    texts, steps = generate_forced("chatml", [answer], max_new_tokens=30, decoder=decoder)
    assert texts[0].startswith(answer) and len(texts[0]) > len(answer)
    assert steps == 30


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_roomy_cache_decodes_like_the_concatenating_one(arch):
    model, tokenizer = ending_model(arch=arch)
    enc = tokenizer(prompts(tokenizer)[:3], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        caches = [model(**enc, use_cache=True).past_key_values for _ in range(2)]
        make_room(caches[1], 4)  # the tiny Mistral's layers are sliding-window ones: left as they are
        assert all(isinstance(layer, RoomyLayer) == (arch == "llama") for layer in caches[1].layers)
        mask, step = enc["attention_mask"], torch.tensor([[5], [6], [7]])
        for n in range(4):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if n == 2:  # a row leaves the batch
                for cache in caches:
                    cache.batch_select_indices(torch.tensor([0, 2]))
                mask, step = mask[[0, 2]], step[[0, 2]]
            plain, roomy = (model(input_ids=step, attention_mask=mask, past_key_values=c).logits for c in caches)
            torch.testing.assert_close(roomy, plain)
        assert caches[1].get_seq_length() == caches[0].get_seq_length() == enc["input_ids"].shape[1] + 4
        if arch == "llama":
            with pytest.raises(RuntimeError, match="full"):
                model(input_ids=step, attention_mask=torch.cat([mask, mask.new_ones(2, 1)], 1),
                      past_key_values=caches[1])


@pytest.mark.parametrize("roomy", [False, True])
def test_the_pruned_decoder_answers_alike_with_either_cache(roomy):
    model, tokenizer = ending_model(adapter=True)
    texts = prompts(tokenizer)
    reference = generate(model, tokenizer, texts, batch_size=1, max_new_tokens=16, decoder="hf")
    assert generate(model, tokenizer, texts, batch_size=3, max_new_tokens=16, roomy_cache=roomy) == reference


def count_static_steps(monkeypatch) -> dict:
    """Counts of the static steps built and of the moves of a batch into a smaller one, while a test runs."""
    counts = {"built": 0, "moved": 0}
    real_init, real_take = StaticStep.__init__, StaticStep.take

    def init(self, *args, **kwargs):
        counts["built"] += 1
        real_init(self, *args, **kwargs)

    def take(self, *args, **kwargs):
        counts["moved"] += 1
        real_take(self, *args, **kwargs)

    monkeypatch.setattr(StaticStep, "__init__", init)
    monkeypatch.setattr(StaticStep, "take", take)
    return counts


@pytest.mark.parametrize("adapter", [False, True])
def test_the_graph_decoder_moves_a_batch_into_smaller_steps_and_answers_alike(adapter, monkeypatch):
    # Mistral v0.3's layout: full attention (no sliding window), grouped key/value heads
    model, tokenizer = ending_model(adapter=adapter, arch="mistral", sliding_window=None)
    texts = prompts(tokenizer)
    reference = generate(model, tokenizer, texts, batch_size=1, max_new_tokens=16, decoder="hf")
    counts = count_static_steps(monkeypatch)
    assert generate(model, tokenizer, texts, batch_size=5, max_new_tokens=16, decoder="graph") == reference
    assert counts["built"] >= 2 and counts["moved"] >= 1  # 8 rows (5 used), then 4 or fewer once some ended


def test_the_graph_decoder_leaves_sliding_window_models_to_eager_steps(monkeypatch, caplog):
    model, tokenizer = ending_model(arch="mistral")  # the tiny Mistral's layers are sliding-window ones
    texts = prompts(tokenizer)
    counts = count_static_steps(monkeypatch)
    with caplog.at_level(logging.INFO, logger="scripts.generation"):
        graphed = generate(model, tokenizer, texts, batch_size=3, max_new_tokens=16, decoder="graph")
    assert graphed == generate(model, tokenizer, texts, batch_size=3, max_new_tokens=16, decoder="prune")
    assert counts["built"] == 0 and caplog.text.count("DynamicSlidingWindowLayer") == 1  # said once, not per batch


def test_static_steps_share_a_cache_length_and_free_the_longer_one():
    model, tokenizer = ending_model()
    layers = model(**tokenizer(["a b c"], return_tensors="pt"), use_cache=True).past_key_values.layers
    graphs = StepGraphs(model)
    first = graphs.step(5, 300, layers)
    assert (first.rows, first.length) == (8, 384) and graphs.step(7, 290, layers) is first  # same rows and length
    smaller = graphs.step(3, 300, layers)
    assert smaller.rows == 4 and graphs.steps == {8: first, 4: smaller}
    shorter = graphs.step(8, 200, layers)
    assert shorter.length == 256 and graphs.steps == {8: shorter}  # the longer length's steps are gone


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@needs_gpu
@pytest.mark.parametrize("adapter", [False, True])
def test_on_a_gpu_the_graph_decoder_replays_captured_steps_and_answers_alike(adapter, monkeypatch):
    model, tokenizer = ending_model(adapter=adapter)
    model = model.cuda()
    texts = prompts(tokenizer)
    reference = generate(model, tokenizer, texts, batch_size=1, max_new_tokens=16, decoder="prune")
    captured = []
    real_capture = StaticStep._capture
    monkeypatch.setattr(StaticStep, "_capture",
                        lambda self, pool=None: (real_capture(self, pool), captured.append(self.graph)))
    assert generate(model, tokenizer, texts, batch_size=5, max_new_tokens=16, decoder="graph") == reference
    assert len(captured) >= 2 and all(graph is not None for graph in captured)


@needs_gpu
def test_on_a_gpu_a_step_that_cannot_be_captured_runs_eagerly(caplog):
    model, tokenizer = ending_model()
    model = model.cuda()
    model.model.layers[0].register_forward_pre_hook(lambda module, args: [float(args[0].sum())] and None)  # a sync
    texts = prompts(tokenizer)
    reference = generate(model, tokenizer, texts, batch_size=5, max_new_tokens=16, decoder="prune")
    with caplog.at_level(logging.WARNING, logger="scripts.generation"):
        assert generate(model, tokenizer, texts, batch_size=5, max_new_tokens=16, decoder="graph") == reference
    assert caplog.text.count("cannot be captured as a CUDA graph") == 1


def test_an_attention_that_takes_no_4d_mask_decodes_eagerly(caplog):
    model, _ = ending_model()
    graphs = StepGraphs(model)
    model.config._attn_implementation = "flash_attention_2"  # as a model loaded with it reports (not run here)
    assert not graphs.fits(None)
    with caplog.at_level(logging.INFO, logger="scripts.generation"):
        graphs.report_unfit(None)
        graphs.report_unfit(None)
    assert caplog.text.count("need sdpa or eager attention; this model's is flash_attention_2") == 1


def test_candidates_depend_on_the_prompt_and_the_seed_not_on_the_batch_nor_the_decoder():
    model, tokenizer = ending_model()
    texts = prompts(tokenizer)
    sampling = Sampling(n=3, temperature=1.0, top_p=0.9, seed=5)
    alone = [generate(model, tokenizer, [t], batch_size=1, max_new_tokens=10, sampling=sampling, decoder="prune")[0]
             for t in texts]
    assert len({a for c in alone for a in c}) > len(texts)  # sampled: not n copies of one answer per prompt
    for decoder in DECODERS:
        for batch_size in (2, 5):
            together = generate(model, tokenizer, texts[::-1], batch_size=batch_size, max_new_tokens=10,
                                sampling=sampling, decoder=decoder)
            assert together[::-1] == alone, (decoder, batch_size)


def test_a_generation_configs_penalties_change_no_decoders_answers():
    """Greedy is the argmax of the model's logits in every decoder: model.generate no longer applies the model's
    repetition penalty or n-gram ban (the other decoders never did)."""
    model, tokenizer = ending_model()
    texts = prompts(tokenizer)
    plain = generate(model, tokenizer, texts, batch_size=1, max_new_tokens=16, decoder="prune")
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 3.0, 1
    model.generation_config.min_new_tokens = 8
    for decoder in DECODERS:
        assert generate(model, tokenizer, texts, batch_size=3, max_new_tokens=16, decoder=decoder) == plain, decoder
    assert model.generation_config.repetition_penalty == 3.0  # the model's own config is left as it was


def test_the_generation_configs_eos_ids_end_answers_in_every_decoder():
    model, tokenizer = ending_model()
    texts = prompts(tokenizer)
    before = generate(model, tokenizer, texts, batch_size=1, max_new_tokens=16, decoder="prune")
    longest = max(range(len(texts)), key=lambda i: len(before[i]))
    ids = tokenizer(before[longest], add_special_tokens=False)["input_ids"]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, ids[len(ids) // 2]]  # one in the middle of it
    for decoder in DECODERS:
        after = generate(model, tokenizer, texts, batch_size=3, max_new_tokens=16, decoder=decoder)[longest]
        assert len(after) < len(before[longest]) and before[longest].startswith(after), decoder


def test_model_generate_arguments_outside_the_hf_decoder_are_an_error():
    model, tokenizer = ending_model()
    with pytest.raises(TypeError, match="cache_implementation"):
        generate(model, tokenizer, prompts(tokenizer)[:1], decoder="prune", cache_implementation="static")


def test_the_padding_rows_of_a_static_step_restart_at_position_zero():
    model, tokenizer = ending_model()
    texts = prompts(tokenizer)[:3]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model(**enc, use_cache=True)
    layers = out.past_key_values.layers
    step = StaticStep(model, 4, 128, layers, capture=False)
    step.positions.fill_(1000)  # what the rows of an earlier, longer batch left
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    step.load(layers, enc["attention_mask"], positions)
    assert step.positions[3] == 0 and step.positions[:3].tolist() == (positions[:, -1] + 1).tolist()


def test_sampling_among_the_likeliest_tokens_matches_sorting_the_whole_vocabulary(monkeypatch):
    import scripts.generation as generation

    torch.manual_seed(0)
    logits = torch.randn(64, 500) * torch.linspace(0.5, 6, 64)[:, None]  # flat to peaked rows
    seeds = torch.arange(64) * 7919
    for top_p in (0.5, 0.95, 1.0):
        sampling = Sampling(n=1, temperature=0.7, top_p=top_p)
        fast = sample_tokens(logits, sampling, seeds, 3)
        monkeypatch.setattr(generation, "SAMPLE_TOP_K", 500)  # every row sorts the whole vocabulary
        assert torch.equal(sample_tokens(logits, sampling, seeds, 3), fast), top_p
        monkeypatch.setattr(generation, "SAMPLE_TOP_K", 8)  # most rows fall back to the whole vocabulary
        assert torch.equal(sample_tokens(logits, sampling, seeds, 3), fast), top_p
        monkeypatch.setattr(generation, "SAMPLE_TOP_K", 256)
