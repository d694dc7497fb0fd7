"""The training benchmark compares its variants on the same examples, and --only keeps the reference."""
from bench.bench_training import LEVERS, REFERENCE, selected_levers, steps_for_same_examples
from scripts.settings import QUANTIZATIONS
from scripts.training import validate_training_configs


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
