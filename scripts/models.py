"""The one loader for model + tokenizer (Hub id, local folder or .gguf file), 4-bit or not, with adapters.

Training and evaluation both call `load_model_and_tokenizer`, so they see the same weights, dtype and tokenizer.
A `.gguf` file is dequantized once into a safetensors folder under `cache_dir` (keyed by the file's path, size and
mtime) with its tokenizer beside it; later loads read that folder. HF_TOKEN is passed to the Hub and nowhere else.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import resource
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from scripts import distributed
from scripts.errors import UserError
from scripts.settings import QUANTIZATIONS

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("cache/models")
SLOW_TOKENIZER_PREFIX = "openlm-research/open_llama"  # its authors advise against the auto-converted fast tokenizer
SENTENCEPIECE_FILE = "tokenizer.model"
GGUF_MARKER = "gguf_source.json"  # written last into a GGUF cache folder: the conversion finished
HUB_PROBE_TIMEOUT_S = 10.0  # one request to the Hub before loading; a Hub that does not answer in time is unreachable


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: kind is "hub", "folder" or "gguf"; path is what from_pretrained reads."""

    kind: str
    path: str
    gguf_file: Path | None = None


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


def _looks_like_path(model_id: str) -> bool:
    """True when model_id can only be a filesystem path (a Hub id is "name" or "owner/name")."""
    return (
        model_id.startswith(("/", "./", "../", "~"))
        or (model_id.count("/") > 1 and not model_id.endswith(".gguf"))
        or (os.sep != "/" and os.sep in model_id)
    )


def resolve_source(model_id: str, token: str | None = None) -> ModelSource:
    """Classify model_id as a local .gguf file, a local folder or a Hub id (a Hub "owner/repo/file.gguf" is downloaded)."""
    model_id = str(model_id)
    path = Path(model_id).expanduser()
    if model_id.endswith(".gguf"):
        if path.is_file():
            return ModelSource("gguf", str(path.resolve()), gguf_file=path.resolve())
        return _hub_gguf(model_id, token)
    if path.is_dir():
        return ModelSource("folder", str(path.resolve()))
    if path.exists():
        raise UserError(f"BASE_MODEL_ID {model_id!r} is a file but not a .gguf: give a model folder, a .gguf file or a Hub id")
    if _looks_like_path(model_id):
        raise UserError(f"BASE_MODEL_ID {model_id!r}: no such folder or file. Fix the path in main.py/.env/--model, "
                        "or give a Hub id like 'owner/name'")
    return ModelSource("hub", model_id)


def _hub_gguf(model_id: str, token: str | None) -> ModelSource:
    """Download "owner/repo/file.gguf" from the Hub (or raise UserError when it is a missing local path)."""
    parts = model_id.split("/")
    if _looks_like_local_gguf(model_id) or len(parts) < 3:
        raise UserError(f"BASE_MODEL_ID {model_id!r}: no such .gguf file. Fix the path in main.py/.env/--model "
                        "(a Hub GGUF is written 'owner/repo/file.gguf')")
    from huggingface_hub import hf_hub_download

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    with hub_errors(model_id):
        local = Path(hf_hub_download(repo_id=repo_id, filename=filename, token=token))
    return ModelSource("gguf", str(local), gguf_file=local)


def check_model_source(model_id: str, token: str | None = None) -> None:
    """Fail fast, before anything is written: a missing local path, an unknown Hub id, or a Hub that cannot be reached."""
    model_id = str(model_id)
    if model_id.endswith(".gguf") and not Path(model_id).expanduser().is_file():
        if _looks_like_local_gguf(model_id) or model_id.count("/") < 2:
            _hub_gguf(model_id, token)  # raises the missing-file message
        parts = model_id.split("/")
        check_hub(model_id, "/".join(parts[:2]), "/".join(parts[2:]), token)
        return
    if resolve_source(model_id, token).kind == "hub":
        check_hub(model_id, model_id, "config.json", token)


def check_hub(model_id: str, repo_id: str, filename: str, token: str | None = None) -> None:
    """One quick request to the Hub for repo_id, without retries: unknown or unreachable is a UserError at once.

    Offline (HF_HUB_OFFLINE=1) nothing is asked of the Hub: the local cache must hold the repo's `filename`.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub import errors as hub

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if _offline_mode():
        if not _in_hub_cache(repo_id, filename):
            raise UserError(f"{model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set. "
                            "Download it once with network access, or set BASE_MODEL_ID to a local folder or .gguf file")
        return
    try:
        HfApi(endpoint=endpoint).model_info(repo_id, token=token or False, timeout=HUB_PROBE_TIMEOUT_S)
    except (hub.RepositoryNotFoundError, hub.HFValidationError) as error:
        raise UserError(hub_error_message(model_id, error)) from None
    except hub.HfHubHTTPError:
        return  # the Hub answered (gated, rate limit, ...): the loader reports what it means
    except Exception as error:  # noqa: BLE001 - no answer at all (refused, timed out, DNS): the Hub is unreachable
        advice = (f"{model_id!r} is in the local cache: set HF_HUB_OFFLINE=1 to use it without the Hub"
                  if _in_hub_cache(repo_id, filename) else
                  f"{model_id!r} is not in the local cache: download it once with network access, or set BASE_MODEL_ID "
                  "to a local folder or .gguf file (and HF_HUB_OFFLINE=1 to run with no network at all)")
        raise UserError(f"the Hugging Face Hub ({endpoint}) cannot be reached ({type(error).__name__}); {advice}") \
            from None


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    """Whether the local Hub cache holds `filename` of repo_id's main revision."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - an id the cache cannot even look up is not cached
        return False


def _looks_like_local_gguf(model_id: str) -> bool:
    """A .gguf id that starts like a filesystem path."""
    return model_id.startswith(("/", "./", "../", "~")) or (os.sep != "/" and os.sep in model_id)


# ---------------------------------------------------------------------------------------------------------------
# Hub errors -> UserError
# ---------------------------------------------------------------------------------------------------------------

def _exception_chain(error: BaseException) -> Iterator[BaseException]:
    """error, its __cause__, their __context__ ... (each once)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _offline_mode() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_error_message(model_id: str, error: BaseException) -> str | None:
    """A user-facing message for a Hub failure, or None when error is not about reaching the model."""
    from huggingface_hub import errors as hub

    chain = list(_exception_chain(error))
    text = " ".join(str(e) for e in chain).lower()
    if any(isinstance(e, hub.GatedRepoError) for e in chain) or "gated" in text:
        return (f"{model_id!r} is a gated model: accept its license on huggingface.co, then set HF_TOKEN in .env "
                "(a token with read access)")
    if any(isinstance(e, (hub.OfflineModeIsEnabled, hub.LocalEntryNotFoundError)) for e in chain) \
            or "couldn't connect" in text or "offline" in text:
        why = "HF_HUB_OFFLINE=1 is set" if _offline_mode() else "the Hugging Face Hub cannot be reached (no network?)"
        return (f"{model_id!r} is not in the local Hugging Face cache and {why}. Download it once with network "
                "access, or set BASE_MODEL_ID to a local folder or .gguf file")
    if any(isinstance(e, (hub.RepositoryNotFoundError, hub.HFValidationError)) for e in chain) \
            or "not a valid model identifier" in text or "repository not found" in text:
        return (f"{model_id!r} was not found on the Hugging Face Hub (check BASE_MODEL_ID in main.py/.env/--model; "
                "for a private model set HF_TOKEN in .env)")
    return None


@contextmanager
def hub_errors(model_id: str) -> Iterator[None]:
    """Turn Hub failures (gated, missing, offline) into UserError; other errors pass through."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as error:
        message = hub_error_message(model_id, error)
        if message is None:
            raise
        raise UserError(message) from None  # the chained Hub error may repeat request headers: keep it out


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
    source = _prepared_source(str(model_id), token, Path(cache_dir))
    tokenizer = _load_tokenizer_from(source, str(model_id), token, use_fast)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# GGUF: dequantize once into a cached safetensors folder
# ---------------------------------------------------------------------------------------------------------------

def gguf_cache_folder(gguf_path: Path, cache_dir: Path) -> Path:
    """cache_dir/<stem>-<key>, the key hashing the file's absolute path, size and mtime."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{gguf_path.stem}-{key}"


def ensure_gguf_converted(gguf_path: Path, cache_dir: Path) -> Path:
    """The cached safetensors folder for this .gguf, converting it first when missing."""
    folder = gguf_cache_folder(gguf_path, cache_dir)
    with distributed.main_process_first():  # under accelerate launch the main process converts, the others wait
        if (folder / GGUF_MARKER).exists():
            log.info("GGUF %s: using the cached conversion in %s", gguf_path, folder)
            return folder
        log.info("GGUF %s: dequantizing once into %s (later loads read that folder)", gguf_path, folder)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        convert_gguf(Path(gguf_path), partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        return folder


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize gguf_path into target/ (safetensors + config + tokenizer), then write the marker."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.integrations.gguf import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _fix_gguf_special_tokens(tokenizer, metadata)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True),
    )
    _fix_gguf_config_ids(model, tokenizer)
    target.mkdir(parents=True, exist_ok=True)
    _save_dense(model, target)
    tokenizer.save_pretrained(target)
    stat = gguf_path.stat()
    (target / GGUF_MARKER).write_text(json.dumps(
        {"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, indent=1))


def _fix_gguf_special_tokens(tokenizer, metadata: dict) -> None:
    """Set bos/eos/unk/pad from the GGUF's own ids: transformers' GGUF tokenizer converter can swap bos and eos."""
    for attribute, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                           ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = metadata.get(f"tokenizer.ggml.{key}")
        if not isinstance(index, int) or not 0 <= index < len(tokenizer):
            continue
        token = tokenizer.convert_ids_to_tokens(index)
        if getattr(tokenizer, attribute) != token:
            log.info("GGUF tokenizer: %s set to %r from the file's metadata", attribute, token)
            setattr(tokenizer, attribute, token)


def _fix_gguf_config_ids(model, tokenizer) -> None:
    """Copy the tokenizer's special token ids into the model and generation configs (generation stops at eos)."""
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id


def _save_dense(model, target: Path) -> None:
    """save_pretrained; if a GGUF-loaded model refuses, copy its weights into a model built from its config."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the dequantized weights are plain dense tensors
    try:
        model.save_pretrained(target)
        return
    except Exception as error:  # noqa: BLE001 - any refusal is handled the same way, and logged
        log.info("GGUF model refused save_pretrained (%s: %s); saving a copy built from its config",
                 type(error).__name__, error)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    dense.load_state_dict(model.state_dict(), strict=True)
    dense.generation_config = model.generation_config
    dense.save_pretrained(target)


def _prepared_source(model_id: str, token: str | None, cache_dir: Path) -> ModelSource:
    """resolve_source, with a GGUF replaced by its cached dense folder; logs which path was taken."""
    source = resolve_source(model_id, token)
    if source.kind == "gguf":
        folder = ensure_gguf_converted(source.gguf_file, cache_dir)
        return ModelSource("folder", str(folder), gguf_file=source.gguf_file)
    log.info("model source: %s %s", "local folder" if source.kind == "folder" else "Hub id", source.path)
    return source


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
def _load_fits(model_id: str, quantization: str) -> Iterator[None]:
    """Turn an out-of-memory error while the weights load into a UserError naming the GPU and what to change."""
    from scripts import gpu_memory

    try:
        yield
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
    source = _prepared_source(str(model_id), token, Path(cache_dir))
    tokenizer = _load_tokenizer_from(source, str(model_id), token, use_fast)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    with hub_errors(str(model_id)), _load_fits(str(model_id), chosen):
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
            with _load_fits(str(model_id), "4bit"):
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
