"""Configuration: main.py's constants < .env < flags, and bad values stop before anything is loaded."""
from pathlib import Path

import pytest

from scripts.errors import UserError
from scripts.settings import STAGES, parse_args, resolve_settings

DEFAULTS = {
    "base_model_id": "org/model",
    "sample_size_eval": 200,
    "sample_size_train": 2000,
    "training_configs": [{"learning_rate": 2e-4}],
}


def settings(tmp_path: Path, *flags: str, env_file: str = "", environ: dict | None = None):
    """Resolve settings with a .env file written by the test."""
    env = tmp_path / ".env"
    env.write_text(env_file)
    return resolve_settings(DEFAULTS, parse_args([*flags, "--env-file", str(env)]), environ=environ or {})


def test_constants_are_the_defaults(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert (s.base_model_id, s.sample_size_eval, s.sample_size_train) == ("org/model", 200, 2000)
    assert s.stages == STAGES
    assert s.db_path == Path("results/results.sqlite")


def test_env_file_overrides_constants_and_flags_override_env(tmp_path: Path) -> None:
    s = settings(tmp_path, env_file="BASE_MODEL_ID=env/model\nDB_PATH=/x/store.sqlite\n")
    assert s.base_model_id == "env/model" and s.db_path == Path("/x/store.sqlite")
    s = settings(tmp_path, "--model", "flag/model", env_file="BASE_MODEL_ID=env/model\n")
    assert s.base_model_id == "flag/model"


def test_environment_overrides_env_file(tmp_path: Path) -> None:
    s = settings(tmp_path, env_file="PATH_MMLU=a\n", environ={"PATH_MMLU": "b"})
    assert s.path_mmlu == Path("b")


def test_all_means_every_example(tmp_path: Path) -> None:
    s = settings(tmp_path, "--sample-size-eval", "all", "--sample-size-train", "10")
    assert s.sample_size_eval is None and s.sample_size_train == 10


def test_results_dir_moves_the_derived_paths(tmp_path: Path) -> None:
    s = settings(tmp_path, "--results-dir", "out")
    assert s.db_path == Path("out/results.sqlite") and s.path_ft_dataset == Path("out/ft_dataset.jsonl")


def test_stages_keep_pipeline_order(tmp_path: Path) -> None:
    assert settings(tmp_path, "--stages", "train,preprocess").stages == ("preprocess", "train")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stages", "train,fly"], "unknown stage"),
        (["--training-configs", "{not json"], "not valid JSON"),
        (["--training-configs", '{"a": 1}'], "list of dicts"),
        (["--eval-batch-size", "0"], "EVAL_BATCH_SIZE"),
        (["--sql-timeout", "-1"], "SQL_TIMEOUT_S"),
        (["--num-candidates", "-1"], "NUM_CANDIDATES must be an integer >= 0"),
        (["--num-candidates", "4", "--vote-temperature", "0"], "VOTE_TEMPERATURE must be > 0"),
        (["--num-candidates", "4", "--vote-top-p", "1.5"], r"VOTE_TOP_P must be in \(0, 1\]"),
        (["--select-adapter-on", "voted"], "needs execution-guided voting: set NUM_CANDIDATES to 2 or more"),
        (["--num-candidates", "1", "--select-adapter-on", "voted"], "set NUM_CANDIDATES to 2 or more"),
    ],
)
def test_bad_values_are_user_errors(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        settings(tmp_path, *flags)


def test_bad_sample_size_flag_is_rejected_by_the_parser(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        settings(tmp_path, "--sample-size-eval", "-5")


def test_token_never_appears_in_public_settings(tmp_path: Path) -> None:
    s = settings(tmp_path, env_file="HF_TOKEN=hf_secret_value_123\n")
    assert s.hf_token == "hf_secret_value_123"
    assert "hf_secret_value_123" not in repr(s) and "hf_secret_value_123" not in str(s.public())
    assert s.public()["hf_token_set"] is True


def test_demo_defaults_fit_a_small_cpu_and_leave_other_runs_alone(tmp_path: Path) -> None:
    from scripts.settings import DEMO_TRAINING_CONFIGS, demo_defaults
    from scripts.training import validate_training_configs

    demo = demo_defaults()
    assert (demo["eval_batch_size"], demo["max_new_tokens"]) == (21, 96)
    (config,) = validate_training_configs(demo["training_configs"])
    assert demo["training_configs"] is DEMO_TRAINING_CONFIGS
    assert config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] == 2
    assert config["num_train_epochs"] == 2 and config["gradient_checkpointing"] is False
    s = settings(tmp_path)  # without --demo: the pipeline's own defaults
    assert (s.eval_batch_size, s.max_new_tokens) == (16, 160)


def test_voting_is_off_by_default_and_set_by_env_and_flags(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert (s.num_candidates, s.vote_temperature, s.vote_top_p, s.select_adapter_on) == (0, 0.7, 0.95, "greedy")
    env = "NUM_CANDIDATES=8\nVOTE_TEMPERATURE=0.9\nVOTE_TOP_P=0.8\nSELECT_ADAPTER_ON=voted\n"
    s = settings(tmp_path, env_file=env)
    assert (s.num_candidates, s.vote_temperature, s.vote_top_p, s.select_adapter_on) == (8, 0.9, 0.8, "voted")
    s = settings(tmp_path, "--num-candidates", "3", "--vote-top-p", "1", "--select-adapter-on", "greedy", env_file=env)
    assert (s.num_candidates, s.vote_temperature, s.vote_top_p, s.select_adapter_on) == (3, 0.9, 1.0, "greedy")


@pytest.mark.parametrize("env_file, message", [
    ("NUM_CANDIDATES=eight\n", "NUM_CANDIDATES in .env must be an integer, got 'eight'"),
    ("NUM_CANDIDATES=4\nVOTE_TOP_P=high\n", "VOTE_TOP_P in .env must be a number, got 'high'"),
    ("SELECT_ADAPTER_ON=best\n", "SELECT_ADAPTER_ON must be one of"),
])
def test_bad_voting_values_in_env_are_user_errors(tmp_path: Path, env_file: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        settings(tmp_path, env_file=env_file)
