"""Configuration: main.py's constants < .env < flags, and bad values stop before anything is loaded."""
import re
from pathlib import Path

import pytest

from scripts.errors import UserError
from scripts.cli import parse_args
from scripts.settings import STAGES, resolve_settings

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
    assert s.db_path == Path("out/results.sqlite") and s.train_chat_file == Path("out/train_chat.jsonl")
    assert s.evaluated_dir == Path("out/eval_sets")
    assert s.path_ft_dataset is None and s.path_task_eval_dataset == () and s.path_databases is None  # Spider's


def test_data_inputs_from_flags_and_env(tmp_path: Path) -> None:
    s = settings(tmp_path, "--ft-dataset", "my_train.jsonl", "--eval-dataset", "a.json, b.jsonl", "--databases", "dbs")
    assert s.path_ft_dataset == Path("my_train.jsonl") and s.path_databases == Path("dbs")
    assert s.path_task_eval_dataset == (Path("a.json"), Path("b.jsonl"))
    assert s.public()["path_task_eval_dataset"] == ["a.json", "b.jsonl"]
    s = settings(tmp_path, env_file="PATH_FT_DATASET=t.json\nPATH_TASK_EVAL_DATASET=e1.json,e2.json\nPATH_DATABASES=d\n")
    assert (s.path_ft_dataset, s.path_task_eval_dataset, s.path_databases) == (
        Path("t.json"), (Path("e1.json"), Path("e2.json")), Path("d"))


def test_every_constant_of_main_py_is_a_env_key(tmp_path: Path) -> None:
    """.env sets each of main.py's constants by its own name (lists as JSON), in its own type."""
    import main
    from scripts.settings import CONSTANTS, ENV_KEYS

    assert set(main.config_defaults()) == set(CONSTANTS)
    assert all(ENV_KEYS[name.upper()] == name for name in CONSTANTS)
    env = """
BASE_MODEL_ID=env/model
SAMPLE_SIZE_EVAL=all
SAMPLE_SIZE_TRAIN=7
TRAINING_CONFIGS=[{"learning_rate": 0.001, "max_steps": 3}]
MMLU_PER_SUBJECT=none
MMLU_K_SHOT=2
EVAL_BATCH_SIZE=4
MAX_NEW_TOKENS=12
SQL_TIMEOUT_S=2.5
SCHEMA_SAMPLE_ROWS=1
QUANTIZATION=none
SEED=9
"""
    s = resolve_settings(main.config_defaults(), parse_args(["--env-file", str(_write(tmp_path, env))]), environ={})
    assert (s.base_model_id, s.sample_size_eval, s.sample_size_train, s.mmlu_per_subject) == ("env/model", None, 7, None)
    assert s.training_configs == [{"learning_rate": 0.001, "max_steps": 3}]
    assert (s.mmlu_k_shot, s.eval_batch_size, s.max_new_tokens, s.schema_sample_rows, s.seed) == (2, 4, 12, 1, 9)
    assert s.sql_timeout_s == 2.5 and s.quantization == "none"
    s = settings(tmp_path, "--sample-size-train", "3", env_file="SAMPLE_SIZE_TRAIN=7\n")  # the flag still wins
    assert s.sample_size_train == 3


def _write(tmp_path: Path, text: str, name: str = "custom.env") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("line, message", [
    ("SAMPLE_SIZE_EVAL=lots", "SAMPLE_SIZE_EVAL in"),
    ("SAMPLE_SIZE_TRAIN=0", "not a positive integer"),
    ("SEED=1.5", "not an integer"),
    ("SQL_TIMEOUT_S=soon", "not a number"),
    ("SQL_TIMEOUT_S=nan", "finite number"),
    ("TRAINING_CONFIGS=[{", "TRAINING_CONFIGS in"),
])
def test_bad_env_values_name_the_key_and_the_file(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as error:
        settings(tmp_path, env_file=line + "\n")
    assert line.split("=")[0] in str(error.value)


def test_unknown_env_key_is_warned_about_with_the_closest_known_one(tmp_path: Path, caplog) -> None:
    s = settings(tmp_path, env_file="SAMPLE_SIZE_EVALL=5\nMIN_EX=0.1\nbase_model=x\n")
    assert s.sample_size_eval == 200  # ignored, not applied
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # MIN_EX is a key of the post-run check: known
    assert "unknown key SAMPLE_SIZE_EVALL" in warnings[0] and "did you mean SAMPLE_SIZE_EVAL?" in warnings[0]
    assert str(tmp_path / ".env") in warnings[0]
    assert "did you mean BASE_MODEL_ID?" in warnings[1]
    caplog.clear()
    settings(tmp_path, env_file="HF_HUB_OFFLINE=1\n")  # a library's variable: it belongs in the environment
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "HF_HUB_OFFLINE is ignored here" in warning and "export HF_HUB_OFFLINE=..." in warning


def test_env_file_given_but_missing_is_an_error_a_missing_default_is_not(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match="--env-file .*nowhere.env not found"):
        resolve_settings(DEFAULTS, parse_args(["--env-file", str(tmp_path / "nowhere.env")]), environ={})
    monkeypatch.chdir(tmp_path)  # no .env here: main.py's constants alone
    assert resolve_settings(DEFAULTS, parse_args([]), environ={}).base_model_id == "org/model"


def test_training_configs_from_a_file(tmp_path: Path) -> None:
    good = _write(tmp_path, '[{"learning_rate": 0.01}]', "configs.json")
    assert settings(tmp_path, "--training-configs", str(good)).training_configs == [{"learning_rate": 0.01}]
    with pytest.raises(UserError, match=r"file .*missing.json not found"):
        settings(tmp_path, "--training-configs", str(tmp_path / "missing.json"))
    bad = _write(tmp_path, '[{"learning_rate": 0.01}', "bad.json")
    with pytest.raises(UserError, match=r"file .*bad.json is not valid JSON .* line 1"):
        settings(tmp_path, "--training-configs", str(bad))
    with pytest.raises(UserError, match=r"TRAINING_CONFIGS in .*: file .*bad.json is not valid JSON"):
        settings(tmp_path, env_file=f"TRAINING_CONFIGS={bad}\n")


def test_output_paths_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    a_file = _write(tmp_path, "x", "a_file")
    with pytest.raises(UserError, match="RESULTS_DIR .* is a file, not a folder"):
        settings(tmp_path, "--results-dir", str(a_file))
    with pytest.raises(UserError, match="cannot be created: .*a_file is a file"):
        settings(tmp_path, "--results-dir", str(a_file / "sub"))
    with pytest.raises(UserError, match="DB_PATH .* is a folder"):
        settings(tmp_path, "--db-path", str(tmp_path))
    with pytest.raises(UserError, match="DB_PATH .*a_file exists and is not an SQLite database"):
        settings(tmp_path, "--db-path", str(a_file))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env", "a_file"]  # nothing created


def test_unwritable_results_dir(tmp_path: Path) -> None:
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # root writes anywhere but on a read-only file system such as sysfs
    target = Path("/sys/text2sql-results") if os.geteuid() == 0 else locked / "results"
    if os.geteuid() == 0 and not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without /sys: no unwritable folder to try")
    try:
        with pytest.raises(UserError, match="cannot be written"):
            settings(tmp_path, "--results-dir", str(target))
    finally:
        locked.chmod(0o755)


def test_db_path_never_takes_over_another_sqlite_database(tmp_path: Path) -> None:
    import sqlite3

    from scripts.store import ResultsStore

    other = tmp_path / "shop.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE items (id INTEGER)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    with pytest.raises(UserError, match="not a results store .*items"):
        settings(tmp_path, "--db-path", str(other))
    assert other.read_bytes() == before
    with ResultsStore(tmp_path / "store.sqlite"):  # an earlier run's store is accepted
        pass
    assert settings(tmp_path, "--db-path", str(tmp_path / "store.sqlite")).db_path == tmp_path / "store.sqlite"


def test_demo_replaces_the_env_data_paths_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)  # the demo data are built under ./data/demo_build
    s = settings(tmp_path, "--demo", env_file="PATH_FT_DATASET=t.json\nPATH_DATABASES=d\n")
    assert (s.path_ft_dataset, s.path_task_eval_dataset, s.path_databases) == (None, (), None)
    assert s.spider_zip == Path("data/demo_build/spider_data.zip")
    assert "--demo uses the bundled demo data: PATH_FT_DATASET in" in caplog.text and "PATH_DATABASES in" in caplog.text


@pytest.mark.parametrize("flags, named", [
    (["--eval-dataset", "mine.json"], "drop --eval-dataset, or drop --demo"),
    (["--ft-dataset", "t.json", "--databases", "dbs"], "drop --ft-dataset, --databases, or drop --demo"),
    (["--mmlu", "m", "--spider-zip", "s.zip"], "drop --spider-zip, --mmlu, or drop --demo"),
])
def test_demo_with_a_data_flag_is_an_error_before_the_demo_data_are_built(tmp_path: Path, monkeypatch, flags,
                                                                         named) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--demo uses the bundled demo data: " + named):
        settings(tmp_path, "--demo", *flags)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]  # no data/demo_build


def _store(tmp_path: Path) -> Path:
    """An earlier run's (empty) results store."""
    from scripts.store import ResultsStore

    with ResultsStore(tmp_path / "store" / "results.sqlite"):
        pass
    return tmp_path / "store" / "results.sqlite"


def test_read_only_store_is_an_error_naming_the_file(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes read-only files: see the test below, which makes the open fail")
    db = _store(tmp_path)
    db.chmod(0o444)
    try:
        with pytest.raises(UserError, match=re.escape(f"DB_PATH (--db-path) {db} cannot be written") + ".*chmod u"):
            settings(tmp_path, "--db-path", str(db))
    finally:
        db.chmod(0o644)


@pytest.mark.parametrize("locked", ["results.sqlite", "results.sqlite-wal"])
def test_store_or_its_wal_file_that_cannot_be_opened_for_writing_is_an_error(tmp_path: Path, monkeypatch,
                                                                            locked: str) -> None:
    db = _store(tmp_path)
    (db.parent / "results.sqlite-wal").write_bytes(b"")  # left beside the store by an earlier run
    real_open = Path.open

    def read_only(self, mode="r", *args, **kwargs):  # what a read-only file gives a user other than root
        if self.name == locked and any(c in mode for c in "wax+"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", read_only)
    before = sorted(p.name for p in db.parent.iterdir())
    with pytest.raises(UserError, match=re.escape(f"DB_PATH (--db-path) {db.parent / locked} cannot be written "
                                                  "(Permission denied); make it writable")):
        settings(tmp_path, "--db-path", str(db))
    assert sorted(p.name for p in db.parent.iterdir()) == before
    monkeypatch.setattr(Path, "open", real_open)
    assert settings(tmp_path, "--db-path", str(db)).db_path == db  # writable: accepted


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
        (["--sql-timeout", "nan"], "SQL_TIMEOUT_S .* finite"),
        (["--sql-timeout", "inf"], "SQL_TIMEOUT_S .* finite"),
        (["--stages", ","], "names no stage"),
        (["--stages", " "], "names no stage"),
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
    from scripts.training_config import validate_training_configs

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
    ("NUM_CANDIDATES=eight\n", "NUM_CANDIDATES in .* is 'eight', not an integer"),
    ("NUM_CANDIDATES=4\nVOTE_TOP_P=high\n", "VOTE_TOP_P in .* is 'high', not a number"),
    ("SELECT_ADAPTER_ON=best\n", "SELECT_ADAPTER_ON must be one of"),
])
def test_bad_voting_values_in_env_are_user_errors(tmp_path: Path, env_file: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        settings(tmp_path, env_file=env_file)


def test_env_example_documents_every_key_and_parses_uncommented(tmp_path: Path, caplog) -> None:
    """.env.example names each key once; with every line uncommented it is a valid .env, without warnings."""
    import re

    from scripts.settings import CHECK_KEYS, ENV_KEYS

    example = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    keys = re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", example, flags=re.M)
    assert sorted(keys) == sorted([*ENV_KEYS, *CHECK_KEYS])
    uncommented = re.sub(r"^# ?([A-Z][A-Z0-9_]+=)", r"\1", example, flags=re.M)
    s = settings(tmp_path, env_file=uncommented)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert s.path_task_eval_dataset == (Path("my_data/my_eval.json"), Path("my_data/holdout.jsonl"))
    assert len(s.training_configs) == 2 and s.sample_size_eval == 200


def help_text(monkeypatch, columns: int) -> str:
    """main.py's --help at a terminal `columns` wide."""
    import main
    from scripts.cli import build_parser

    monkeypatch.setenv("COLUMNS", str(columns))
    return build_parser(main.config_defaults()).format_help()


def test_help_groups_the_inputs_and_the_outputs(monkeypatch) -> None:
    text = help_text(monkeypatch, 100)
    inputs, outputs = text.split("\ninputs")[1].split("\noutputs:")
    for flag in ("--ft-dataset FILE", "--eval-dataset FILE[,FILE...]", "--databases DIR", "--spider-zip PATH",
                 "--mmlu DIR"):
        assert flag in inputs and flag not in outputs, flag
    assert "--results-dir DIR" in outputs and "--db-path FILE" in outputs


def test_every_flag_has_a_help_naming_its_default() -> None:
    """Each option: a help text; one that takes a value ends with its default, main.py's constant where it has one."""
    import main
    from scripts.cli import build_parser
    from scripts.settings import CONSTANTS

    constants = main.config_defaults()
    for action in build_parser(constants)._actions:
        flag = action.option_strings[-1]
        assert action.help and action.help.strip(), flag
        if action.nargs == 0:  # --help, --demo, --force: switches, off unless given
            continue
        assert "(default: " in action.help, flag
        if action.dest in CONSTANTS and action.dest != "training_configs":
            value = constants[action.dest]
            assert f"(default: {'all' if value is None else value})" in action.help, flag
    assert "(default: TRAINING_CONFIGS in main.py, 2 runs)" in build_parser(constants).format_help()


@pytest.mark.parametrize("columns", [80, 120])
def test_help_fits_the_terminal_and_keeps_names_whole(monkeypatch, columns: int) -> None:
    text = help_text(monkeypatch, columns)
    assert max(map(len, text.splitlines())) <= columns
    lines = text.splitlines()
    for stage in STAGES:  # the stage table: one stage a line, its name whole
        assert sum(line.startswith(f"  {stage} ") for line in lines) == 1, stage
    for name in ("openlm-research/open_llama_3b_v2", "SmolLM2-135M-Instruct", "<results-dir>/results.sqlite"):
        assert name in text, name
    assert not any(line.rstrip().endswith("(default:") for line in lines)


def test_help_answers_without_loading_torch() -> None:
    """`main.py --help` in a fresh process: exit 0, and none of the heavy libraries imported."""
    import subprocess
    import sys

    script = ("import runpy, sys\n"
              "sys.argv = ['main.py', '--help']\n"
              "try:\n"
              "    runpy.run_path('main.py', run_name='__main__')\n"
              "except SystemExit as e:\n"
              "    code = e.code\n"
              "heavy = {'torch', 'transformers', 'datasets', 'peft', 'trl', 'accelerate', 'bitsandbytes'}\n"
              "print('EXIT', code, sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert "usage: main.py" in done.stdout, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "EXIT 0 []", done.stdout[-500:] + done.stderr
