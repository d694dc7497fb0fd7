"""Where the weights come from: a Hub id, a local folder or a .gguf file (converted once into a cached folder).

`check_model_source` fails fast, before anything is written, on a missing path, a folder without a model (no
config.json, weights or tokenizer; a folder of .gguf files names the file to pass), an unknown Hub id or a Hub that
cannot be reached; Hub failures become UserErrors (`hub_errors`). A `.gguf` file is dequantized once into a
safetensors folder under the cache folder (keyed by the file's path, size and mtime) with its tokenizer beside
it; later loads read that folder (`prepared_source`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from scripts import distributed
from scripts.errors import UserError

log = logging.getLogger(__name__)

GGUF_MARKER = "gguf_source.json"  # written last into a GGUF cache folder: the conversion finished
HUB_PROBE_TIMEOUT_S = 10.0  # one request to the Hub before loading; a Hub that does not answer in time is unreachable


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: kind is "hub", "folder" or "gguf"; path is what from_pretrained reads."""

    kind: str
    path: str
    gguf_file: Path | None = None


# ---------------------------------------------------------------------------------------------------------------
# Hub id, folder or .gguf
# ---------------------------------------------------------------------------------------------------------------

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
    """Fail fast, before anything is written: a missing local path, a folder with no model in it, an unknown Hub id,
    or a Hub that cannot be reached."""
    model_id = str(model_id)
    if model_id.endswith(".gguf") and not Path(model_id).expanduser().is_file():
        if _looks_like_local_gguf(model_id) or model_id.count("/") < 2:
            _hub_gguf(model_id, token)  # raises the missing-file message
        parts = model_id.split("/")
        check_hub(model_id, "/".join(parts[:2]), "/".join(parts[2:]), token)
        return
    source = resolve_source(model_id, token)
    if source.kind == "hub":
        check_hub(model_id, model_id, "config.json", token)
    elif source.kind == "folder":
        check_model_folder(model_id, Path(source.path))


WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")  # from_pretrained's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model")


def check_model_folder(model_id: str, folder: Path) -> None:
    """A model folder holds config.json, weights and tokenizer files; a folder of .gguf files names the file to pass."""
    where = f"BASE_MODEL_ID {model_id!r} (main.py, .env or --model)"
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            files = " or ".join(str(p) for p in ggufs[:3])
            raise UserError(f"{where} is the folder that holds {', '.join(p.name for p in ggufs[:3])}: "
                            f"pass the .gguf file itself, e.g. --model {files}")
        if (folder / "adapter_config.json").is_file():
            raise UserError(f"{where} is a LoRA adapter folder (adapter_config.json), not a model: give the base "
                            "model it was trained from (the pipeline trains its own adapters)")
        raise UserError(f"{where}: folder {folder} holds no model (no config.json); give a folder saved with "
                        "save_pretrained (config.json, weights, tokenizer), a .gguf file or a Hub id")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"{where}: folder {folder} has config.json but no weights (*.safetensors or "
                        "pytorch_model*.bin); copy the weight files there (a download may have stopped early)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{where}: folder {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                        "copy them from where the model came from (tokenizer.save_pretrained writes them)")


def check_hub(model_id: str, repo_id: str, filename: str, token: str | None = None) -> None:
    """One quick request to the Hub for repo_id, without retries: unknown or unreachable is a UserError at once.

    Offline (HF_HUB_OFFLINE=1) nothing is asked of the Hub: the local cache must hold the repo's `filename`.
    """
    from huggingface_hub import errors as hub

    if _offline_mode():
        if not _in_hub_cache(repo_id, filename):
            raise UserError(f"{model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set. "
                            "Download it once with network access, or set BASE_MODEL_ID to a local folder or .gguf file")
        return
    try:
        unreachable = hub_unreachable(repo_id, token)
    except (hub.RepositoryNotFoundError, hub.HFValidationError) as error:
        raise UserError(hub_error_message(model_id, error)) from None
    if unreachable:
        advice = (f"{model_id!r} is in the local cache: set HF_HUB_OFFLINE=1 to use it without the Hub"
                  if _in_hub_cache(repo_id, filename) else
                  f"{model_id!r} is not in the local cache: download it once with network access, or set BASE_MODEL_ID "
                  "to a local folder or .gguf file (and HF_HUB_OFFLINE=1 to run with no network at all)")
        raise UserError(f"the Hugging Face Hub ({hub_endpoint()}) cannot be reached ({unreachable}); {advice}")


def hub_endpoint() -> str:
    """The Hub's address: HF_ENDPOINT, else huggingface_hub's default."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_unreachable(repo_id: str, token: str | None = None, repo_type: str = "model") -> str | None:
    """One request about repo_id with a short timeout and no retries: None when the Hub answers, else why not.

    A repo the Hub says does not exist (RepositoryNotFoundError, HFValidationError) is raised to the caller.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub

    try:
        HfApi(endpoint=hub_endpoint()).repo_info(repo_id, repo_type=repo_type, token=token or False,
                                                 timeout=HUB_PROBE_TIMEOUT_S)
    except (hub.RepositoryNotFoundError, hub.HFValidationError):
        raise
    except hub.HfHubHTTPError:
        return None  # the Hub answered (gated, rate limit, ...): the loader reports what it means
    except Exception as error:  # noqa: BLE001 - no answer at all (refused, timed out, DNS): the Hub is unreachable
        return type(error).__name__
    return None


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


def prepared_source(model_id: str, token: str | None, cache_dir: Path) -> ModelSource:
    """resolve_source, with a GGUF replaced by its cached dense folder; logs which path was taken."""
    source = resolve_source(model_id, token)
    if source.kind == "gguf":
        folder = ensure_gguf_converted(source.gguf_file, cache_dir)
        return ModelSource("folder", str(folder), gguf_file=source.gguf_file)
    log.info("model source: %s %s", "local folder" if source.kind == "folder" else "Hub id", source.path)
    return source
