"""GPU memory for every stage: free what a stage no longer needs, recognise out-of-memory errors, describe the GPU.

Training retries a CUDA out-of-memory error with a smaller batch (scripts/training.py); a run that cannot fit stops
with a message built from `gpu_memory_text()` and `requested_text()`. Freeing and recognising are accelerate's own
helpers (`clear_device_cache`, `should_reduce_batch_size`), imported when called.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

GIB = 1024 ** 3
_TRIED = re.compile(r"Tried to allocate ([0-9.]+ [KMGT]iB)")


def release_memory() -> None:
    """Collect garbage (models held in reference cycles) and hand the freed device memory back (empty_cache)."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether error, or an error it was raised from, is out of memory (CUDA, CPU allocator; accelerate's test)."""
    from accelerate.utils.memory import should_reduce_batch_size

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.cuda.OutOfMemoryError) or should_reduce_batch_size(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def split_on_oom(run: Callable[[list], list], batch: list, what: str = "items") -> list:
    """run(batch); on out-of-memory run its two halves instead (results concatenated), down to one item."""
    try:
        return run(batch)
    except Exception as error:  # noqa: BLE001 - only out-of-memory errors are split, the rest re-raised
        if len(batch) == 1 or not is_out_of_memory(error):
            raise
    release_memory()  # outside the except block, so the failed attempt's tensors are no longer referenced
    log.warning("out of GPU memory with %d %s in a batch; splitting it", len(batch), what)
    half = len(batch) // 2
    return split_on_oom(run, batch[:half], what) + split_on_oom(run, batch[half:], what)


def requested_text(error: BaseException) -> str | None:
    """The size of the allocation that failed ("2.00 GiB"), read from the out-of-memory message, or None."""
    found = _TRIED.search(str(error))
    return found.group(1) if found else None


def usable_bytes(device: int | None = None) -> int | None:
    """Bytes this process may allocate on the GPU (its total memory times the per-process fraction), None on CPU."""
    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device() if device is None else device
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return int(total * min(1.0, fraction))


def free_bytes(device: int | torch.device | None = None) -> int | None:
    """Bytes this process can still allocate on the GPU: the device's free memory and what torch's allocator holds
    unused, within the per-process cap; None on CPU."""
    if not torch.cuda.is_available():
        return None
    index = getattr(device, "index", device)  # a torch.device or an index
    index = torch.cuda.current_device() if index is None else index
    free, _ = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    held = torch.cuda.memory_reserved(index) - allocated  # reusable by this process, not free to the device
    return max(0, min(free + held, usable_bytes(index) - allocated))


def gpu_memory_text(device: int | None = None) -> str:
    """One line for messages: the GPU, its memory (and this process's cap, if set) and the peak this process used."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (running on the CPU)"
    device = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(device)
    usable = usable_bytes(device)
    cap = "" if usable >= props.total_memory else f", {usable / GIB:.1f} GiB of it usable by this process"
    return (f"GPU {device} ({props.name}): {props.total_memory / GIB:.1f} GiB{cap}; this process's peak "
            f"{torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved(device) / GIB:.1f} GiB reserved")
