"""The one loader for model + tokenizer (Hub id, local folder or .gguf file), 4-bit or not, with adapters.

Training and evaluation both call `load_model_and_tokenizer`, so they see the same weights, dtype and tokenizer.
Where the weights come from (and a `.gguf` file's cached conversion) is scripts/model_source.py. HF_TOKEN is
passed to the Hub and nowhere else.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from scripts import distributed
from scripts.errors import UserError
from scripts.model_source import ModelSource, check_model_folder, hub_errors, prepared_source
from scripts.settings import QUANTIZATIONS

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("cache/models")
SLOW_TOKENIZER_PREFIX = "openlm-research/open_llama"  # its authors advise against the auto-converted fast tokenizer
SENTENCEPIECE_FILE = "tokenizer.model"


# ---------------------------------------------------------------------------------------------------------------
# Decisions (pure functions, unit-tested)
# ---------------------------------------------------------------------------------------------------------------

def choose_quantization(requested: str, cuda_available: bool | None = None) -> tuple[str, str]:
    """("4bit" | "none", why) for QUANTIZATION = requested on this machine."""
    if requested not in QUANTIZATIONS:
        raise UserError(f"QUANTIZATION must be one of {QUANTIZATIONS}, got {requested!r} (main.py, .env or --quantization)")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "auto":
        if cuda:
            return "4bit", "auto: CUDA available, so 4-bit NF4 (QLoRA)"
        return "none", "auto: no CUDA, so full-precision float32 (plain LoRA is faster than 4-bit on CPU)"
    where = "CUDA" if cuda else "CPU"
    return requested, f"{requested} requested, running on {where}"


@dataclass(frozen=True)
class Precision:
    """The compute dtype of weights and 4-bit matmuls, and the Trainer's mixed-precision flags, on this machine."""

    dtype: torch.dtype
    bf16: bool  # TrainingArguments(bf16=...)
    fp16: bool  # TrainingArguments(fp16=...): with the trainable (LoRA) weights in float32
    reason: str


def precision(cuda_available: bool | None = None) -> Precision:
    """bf16 on GPUs with native bf16 (Ampere on), fp16 mixed precision on older ones, float32 on CPU.

    torch.cuda.is_bf16_supported() alone says True on a T4 (compute capability 7.5) because it counts emulation,
    which is slow: including_emulation=False asks for the real thing.
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not cuda:
        return Precision(torch.float32, False, False, "CPU: float32 (bf16 matmuls are ~10x slower there)")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    gpu = f"{props.name} (compute capability {props.major}.{props.minor})"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return Precision(torch.bfloat16, True, False, f"{gpu} has native bf16: bf16 compute and mixed precision")
    return Precision(torch.float16, False, True, f"{gpu} has no native bf16 (torch would emulate it, slowly): "
                                                 "fp16 compute, fp16 mixed precision, LoRA weights in float32")


def default_use_fast(model_id: str, folder: str | Path | None = None) -> bool:
    """False (sentencepiece's own tokenizer) for OpenLLaMA ids and for a folder with tokenizer.model but no tokenizer.json.

    OpenLLaMA's authors report wrong tokenizations from the auto-converted fast tokenizer, and transformers 5 cannot
    convert a sentencepiece-only folder without protobuf; a folder that has a tokenizer.json loads it as it is.
    """
    if str(model_id).startswith(SLOW_TOKENIZER_PREFIX):
        return False
    if folder is not None and Path(folder).is_dir():
        folder = Path(folder)
        return not ((folder / SENTENCEPIECE_FILE).is_file() and not (folder / "tokenizer.json").is_file())
    return True


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token without adding a token (so embeddings never need resizing): unk, else eos."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if fallback is None:
        raise UserError("the tokenizer has no pad, unk or eos token; choose a model whose tokenizer defines eos")
    tokenizer.pad_token = fallback
    log.info("tokenizer has no pad token: using %r (no new token, embeddings unchanged)", fallback)


def _sentencepiece_tokenizer_class():
    """scripts.sentencepiece_tokenizer.SentencePieceTokenizer, or a UserError saying how to install sentencepiece."""
    if importlib.util.find_spec("sentencepiece") is None:
        raise UserError("this model's tokenizer is a sentencepiece tokenizer.model, read by the sentencepiece package "
                        "(the auto-converted fast tokenizer mis-tokenizes it): install it with "
                        "`pip install sentencepiece` (it is in requirements.txt)")
    from scripts.sentencepiece_tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer


def _load_tokenizer_from(source: ModelSource, model_id: str, token: str | None, use_fast: bool | None):
    """The fast tokenizer (AutoTokenizer) or sentencepiece's own for a resolved (non-GGUF) source, Hub errors translated."""
    from transformers import AutoTokenizer

    if use_fast is None:
        use_fast = default_use_fast(model_id, source.path if source.kind == "folder" else None)
    if use_fast:
        with hub_errors(model_id):
            return AutoTokenizer.from_pretrained(source.path, token=token)
    tokenizer_class = _sentencepiece_tokenizer_class()
    if source.kind == "folder" and not (Path(source.path) / SENTENCEPIECE_FILE).is_file():
        raise UserError(f"{source.path} has no {SENTENCEPIECE_FILE}, so its tokenizer cannot be loaded with "
                        "sentencepiece (use_fast=False): leave use_fast unset to load its tokenizer.json")
    log.info("tokenizer: sentencepiece's own (%s), not a converted fast tokenizer", SENTENCEPIECE_FILE)
    with hub_errors(model_id):
        return tokenizer_class.from_pretrained(source.path, token=token)


def load_tokenizer(model_id: str, token: str | None = None, *, use_fast: bool | None = None,
                   cache_dir: Path = DEFAULT_CACHE_DIR):
    """The model's tokenizer with a pad token and padding_side="left" (for generation); use_fast: see default_use_fast."""
    token = _token(token)
    source = prepared_source(str(model_id), token, Path(cache_dir))
    tokenizer = _load_tokenizer_from(source, str(model_id), token, use_fast)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

def _token(token: str | None) -> str | None:
    """The HF token: the argument, else HF_TOKEN from the environment, else None (never logged)."""
    return token or os.environ.get("HF_TOKEN") or None


def _model_kwargs(quantization: str, cuda: bool, attn_implementation: str | None = None) -> dict:
    """from_pretrained kwargs for "4bit" or "none" on this machine (and an attention implementation, if given)."""
    dtype = precision(cuda).dtype
    kwargs: dict = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if cuda:  # the whole model on one GPU: this process's own under accelerate launch (data parallel)
        kwargs["device_map"] = {"": distributed.local_rank() if distributed.launched() else torch.cuda.current_device()}
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        )
    return kwargs


def _load_adapter(model, adapter: str | Path, for_training: bool):
    """The base model wrapped with the PEFT adapter saved in `adapter`."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"adapter folder {adapter} has no adapter_config.json: train it first (stage 4) or fix the path")
    log.info("loading adapter %s", adapter)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=for_training)


class DoesNotFit(UserError):
    """The model's weights ran out of memory as they loaded (the message names the GPU and what to change)."""


@contextmanager
def load_fits(model_id: str, quantization: str) -> Iterator[None]:
    """Turn an out-of-memory error while the weights load into a UserError naming the GPU and what to change."""
    from scripts import gpu_memory

    try:
        yield
    except DoesNotFit:
        raise  # already said (a loader inside another load_fits)
    except Exception as error:  # noqa: BLE001 - only out-of-memory errors are translated, the rest re-raised
        if not gpu_memory.is_out_of_memory(error):
            raise
        fix = ("set QUANTIZATION to 4bit (main.py, .env or --quantization) or choose a smaller model (BASE_MODEL_ID)"
               if quantization != "4bit" else "choose a smaller model (BASE_MODEL_ID) or a GPU with more memory")
        raise DoesNotFit(f"{model_id!r} does not fit in memory: out of memory while its weights load "
                         f"({gpu_memory.gpu_memory_text()}); {fix}") from None


def load_model_and_tokenizer(
    model_id: str,
    *,
    adapter: str | Path | None = None,
    quantization: str = "auto",
    token: str | None = None,
    for_training: bool = False,
    gradient_checkpointing: bool = False,
    use_fast: bool | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    attn_implementation: str | None = None,
):
    """(model, tokenizer) for a Hub id, local folder or .gguf; 4-bit NF4 or full precision; optional PEFT adapter.

    The tokenizer has a pad token and padding_side="left" (use_fast=None: see default_use_fast); attn_implementation
    (e.g. "eager") overrides the model's default attention. For training with 4-bit the model goes through
    peft.prepare_model_for_kbit_training (gradient checkpointing as given); otherwise the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM

    token = _token(token)
    cuda = torch.cuda.is_available()
    chosen, why = choose_quantization(quantization, cuda)
    log.info("quantization: %s (%s); precision: %s", chosen, why, precision(cuda).reason)
    source = prepared_source(str(model_id), token, Path(cache_dir))
    if source.kind == "folder" and source.gguf_file is None:  # else transformers blames a missing sentencepiece
        check_model_folder(str(model_id), Path(source.path))
    tokenizer = _load_tokenizer_from(source, str(model_id), token, use_fast)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    with hub_errors(str(model_id)), load_fits(str(model_id), chosen):
        model = AutoModelForCausalLM.from_pretrained(source.path, token=token,
                                                     **_model_kwargs(chosen, cuda, attn_implementation))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if for_training and chosen == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},  # the reentrant default is deprecated in torch
        )
    if adapter is not None:
        model = _load_adapter(model, adapter, for_training)
    if not for_training:
        model.eval()
    return model, tokenizer


def forward_parameters(model) -> set[str]:
    """Parameter names of the underlying model's forward (through a PEFT wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def keep_last_logits(model, keep: int) -> dict:
    """The forward argument that limits the logits to the last `keep` positions, when the model has one."""
    params = forward_parameters(model)
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: keep}
    return {}


def load_for_evaluation(model_id: str, adapter: str | Path | None, quantization: str, eval_precision: str,
                        token: str | None = None):
    """(model, tokenizer) for the EX and MMLU stages: "4bit" as trained (QUANTIZATION's choice), or "merged": the
    adapter merged into the base weights it was trained on, unquantized (faster decoding, about 2 bytes per
    parameter of GPU memory)."""
    from scripts.settings import EVAL_PRECISIONS

    if eval_precision not in EVAL_PRECISIONS:
        raise UserError(f"EVAL_PRECISION must be one of {EVAL_PRECISIONS}, got {eval_precision!r} "
                        "(main.py, .env or --eval-precision)")
    if eval_precision == "4bit":
        return load_model_and_tokenizer(model_id, adapter=adapter, quantization=quantization, token=token)
    trained_on = choose_quantization(quantization)[0]
    try:
        model, tokenizer = load_model_and_tokenizer(model_id, quantization=trained_on, token=token)
        if trained_on == "4bit":
            # an adapter trained on NF4 weights learned their rounding: merging it into the original weights
            # instead lost 3 EX points on Qwen2.5-Coder-0.5B (docs/RESULTS.md, section 19)
            with load_fits(str(model_id), "4bit"):
                model = model.dequantize(dtype=precision(torch.cuda.is_available()).dtype)
            model.is_loaded_in_4bit = False  # transformers leaves the flag set; PEFT reads it when it wraps layers
    except DoesNotFit:
        from scripts import gpu_memory

        raise UserError(f"{model_id!r} does not fit in memory unquantized, as EVAL_PRECISION=merged needs it (about 2 "
                        f"bytes per parameter; {gpu_memory.gpu_memory_text()}): set EVAL_PRECISION to 4bit (main.py, "
                        ".env or --eval-precision) to evaluate as trained") from None
    if adapter is not None:
        model = _load_adapter(model, adapter, for_training=False).merge_and_unload()
    return model.eval(), tokenizer


class ModelCache:
    """Keeps the last loaded model, so the baseline EX and MMLU stages share one load of the base model."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self._key: str | None = None
        self._loaded = None

    def get(self, adapter: str | None = None):
        """(model, tokenizer) for the base model, or the base model with this adapter."""
        key = adapter or ""
        if self._key != key:
            self.release()  # free the previous model before loading the next one
            self._loaded = load_for_evaluation(self.settings.base_model_id, adapter, self.settings.quantization,
                                               self.settings.eval_precision, token=self.settings.hf_token)
            self._key = key
        return self._loaded

    def release(self) -> None:
        """Drop the cached model and give its memory back (before training loads its own copy)."""
        from scripts.gpu_memory import release_memory

        self._key, self._loaded = None, None
        release_memory()


# ---------------------------------------------------------------------------------------------------------------
# Device facts for the report
# ---------------------------------------------------------------------------------------------------------------

def describe_device(quantization: str = "auto") -> dict:
    """Device name, CUDA/bf16 availability, and the quantization and compute dtype this machine gets."""
    cuda = torch.cuda.is_available()
    chosen, why = choose_quantization(quantization, cuda)
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "cuda_available": cuda,
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported(including_emulation=False)),
        "quantization": chosen,
        "quantization_reason": why,
        "compute_dtype": str(precision(cuda).dtype).replace("torch.", ""),
        "torch": torch.__version__,
    }


def peak_memory_gb() -> float:
    """Peak CUDA memory allocated by this process (GB), or its peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9
