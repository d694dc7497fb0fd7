"""GPU memory across stages: models released between stages, out-of-memory errors recognised, no bitsandbytes unasked."""
import json
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch

import main
import scripts.models
from scripts import gpu_memory
from scripts.demo_data import build_demo_data
from scripts.models import ModelCache
from scripts.settings import ENV_KEYS
from tests.conftest import REPO_ROOT
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The demo's Spider zip and MMLU folder, and a tiny chat model saved as a local folder."""
    root = tmp_path_factory.mktemp("inputs")
    spider_zip, mmlu_dir = build_demo_data(root / "demo")
    return {"model": save_tiny_model(root / "model", kind="chatml"), "zip": spider_zip, "mmlu": mmlu_dir}


def argv(root, inputs, stages: str, configs: list[dict] | None = None) -> list[str]:
    """A small pipeline command, every output under root, 4-bit never asked for."""
    (root / "empty.env").write_text("")  # no .env of the checkout leaks in
    configs = configs or [{"learning_rate": 1e-2, "max_steps": 1, "per_device_train_batch_size": 2,
                           "gradient_accumulation_steps": 1, "max_length": 1024, "gradient_checkpointing": False}]
    return ["--model", str(inputs["model"]), "--spider-zip", str(inputs["zip"]), "--mmlu", str(inputs["mmlu"]),
            "--results-dir", str(root / "results"), "--db-path", str(root / "store" / "results.sqlite"),
            "--sample-size-eval", "3", "--sample-size-train", "4", "--mmlu-per-subject", "1", "--eval-batch-size", "3",
            "--max-new-tokens", "4", "--quantization", "none", "--stages", stages,
            "--training-configs", json.dumps(configs), "--env-file", str(root / "empty.env")]


def test_out_of_memory_errors_are_recognised():
    message = "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 14.56 GiB"
    assert gpu_memory.is_out_of_memory(torch.cuda.OutOfMemoryError("anything"))
    assert gpu_memory.is_out_of_memory(RuntimeError(message)) and gpu_memory.requested_text(RuntimeError(message)) == "2.50 GiB"
    try:  # raised while handling one: recognised through the chain
        try:
            raise torch.cuda.OutOfMemoryError(message)
        except RuntimeError as error:
            raise ValueError("a forward hook failed") from error
    except ValueError as wrapped:
        assert gpu_memory.is_out_of_memory(wrapped)
    assert not gpu_memory.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not gpu_memory.is_out_of_memory(ValueError("out of range")) and gpu_memory.requested_text(ValueError()) is None


def test_gpu_memory_text_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_memory.gpu_memory_text() == "no CUDA GPU (running on the CPU)" and gpu_memory.usable_bytes() is None


def test_model_cache_releases_the_model_it_held(tmp_path, monkeypatch):
    folder = save_tiny_model(tmp_path / "m", "chatml")
    settings = SimpleNamespace(base_model_id=str(folder), quantization="none", eval_precision="4bit", hf_token=None)
    cache = ModelCache(settings)
    model, _ = cache.get()
    held = weakref.ref(model)
    del model
    assert held() is not None and cache.get()[0] is held()  # the same load, shared by the baseline stages
    cache.release()
    assert held() is None  # freed without the test collecting garbage


def test_pipeline_releases_each_model_before_the_next_loads(inputs, tmp_path, monkeypatch):
    """Baseline EX, pre-processing, training, adapter EX: when a model loads, every earlier one is gone."""
    loaded: list[tuple[str, weakref.ref]] = []
    alive_at_load: list[list[str]] = []
    real_load = scripts.models.load_model_and_tokenizer

    def load(model_id, **kwargs):
        alive_at_load.append([kind for kind, ref in loaded if ref() is not None])
        model, tokenizer = real_load(model_id, **kwargs)
        kind = "training" if kwargs.get("for_training") else "adapter" if kwargs.get("adapter") else "base"
        loaded.append((kind, weakref.ref(model)))
        return model, tokenizer

    monkeypatch.setattr(scripts.models, "load_model_and_tokenizer", load)
    monkeypatch.chdir(tmp_path)
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert main.main(argv(tmp_path, inputs, "data,baseline_ex,preprocess,train,eval_adapters")) == 0
    assert [kind for kind, _ in loaded] == ["base", "training", "adapter"]
    assert alive_at_load == [[], [], []]


def test_evaluation_without_quantization_never_imports_bitsandbytes(inputs, tmp_path):
    """`import main` and the baseline stages in a fresh process: no bitsandbytes (nor its warning), no peft, no trl."""
    script = (
        "import sys, main\n"
        f"status = main.main({argv(tmp_path, inputs, 'data,baseline_ex,baseline_mmlu')!r})\n"
        "print('STATUS', status, sorted({m.split('.')[0] for m in sys.modules} & {'bitsandbytes', 'peft', 'trl'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**_clean_env(), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert "STATUS 0 []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "bitsandbytes" not in done.stderr and "kernels-community" not in done.stderr


def _clean_env() -> dict:
    """This process's environment without the pipeline's own settings (.env keys)."""
    import os

    return {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
