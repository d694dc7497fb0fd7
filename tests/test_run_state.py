"""Stage results are reused for the same inputs, recomputed for new inputs or with force."""
from pathlib import Path

from scripts.run_state import StageCache, fingerprint


def test_fingerprint_is_stable_and_input_sensitive() -> None:
    assert fingerprint("m", [1, 2], {"a": Path("x")}) == fingerprint("m", [1, 2], {"a": Path("x")})
    assert fingerprint("m", [1, 2]) != fingerprint("m", [2, 1])


def test_same_inputs_skip_the_stage(tmp_path: Path) -> None:
    calls = []
    cache = StageCache(tmp_path)
    compute = lambda: calls.append(1) or {"ex": 0.5}  # noqa: E731
    assert cache.run("baseline_ex", "k1", compute) == {"ex": 0.5}
    assert cache.run("baseline_ex", "k1", compute) == {"ex": 0.5}
    assert len(calls) == 1
    cache.run("baseline_ex", "k2", compute)
    assert len(calls) == 2
    StageCache(tmp_path, force=True).run("baseline_ex", "k2", compute)
    assert len(calls) == 3


def test_an_interrupted_stage_leaves_no_result(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)

    def interrupted():
        raise KeyboardInterrupt

    try:
        cache.run("train", "k", interrupted)
    except KeyboardInterrupt:
        pass
    assert cache.load("train", "k") is None and not list(tmp_path.glob("*.tmp"))
