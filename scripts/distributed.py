"""Several processes (`accelerate launch main.py`): rank, main process, work split, gather, broadcast, barrier.

One place knows whether this run has several processes. Launched by `accelerate launch` (or torchrun), which
sets WORLD_SIZE, RANK and LOCAL_RANK, the first call starts the process group through accelerate's
PartialState (NCCL on CUDA; gloo on CPU, where ACCELERATE_USE_CPU is set so that the Trainer's own
PartialState picks CPU too); the collectives then go through torch.distributed. Run as `python main.py`
(one process) every helper is a no-op: rank 0 of 1, `shard` keeps every index, `gather(x)` is `[x]`,
`broadcast(x)` is `x`, and neither accelerate nor torch.distributed is touched.

The pipeline's rule: every process evaluates its share and trains its data-parallel replica; the main process
alone writes the results store, the stage files, the adapters and the report, and sends the others what
later stages need.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
# Processes wait in a collective while the main process scores SQL or writes files: allow that much.
TIMEOUT = timedelta(hours=2)
_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """Whether a launcher started several processes (read from the environment; starts nothing)."""
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name)
        if value:
            return int(value) > 1
    return False


def _use_cpu() -> bool:
    """CPU processes (gloo): asked for with ACCELERATE_USE_CPU, or no CUDA on this machine."""
    import torch

    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes", "on")
    return asked or not torch.cuda.is_available()


def _group() -> bool:
    """True with several processes, starting the process group the first time; False for one process."""
    if not launched():
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        cpu = _use_cpu()
        if cpu:  # the Trainer builds its own PartialState from this variable: without it, it would not do DDP
            os.environ["ACCELERATE_USE_CPU"] = "true"
        state = PartialState(cpu=cpu, timeout=TIMEOUT)
        log.info("distributed: process %d of %d (local %d), %s, backend %s", state.process_index,
                 state.num_processes, state.local_process_index, state.device, state.backend)
    return True


def world_size() -> int:
    """How many processes run the pipeline (1 without a launcher)."""
    if not _group():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def rank() -> int:
    """This process's global index (0 is the main process)."""
    if not _group():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses."""
    if not _group():
        return 0
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Whether this is the main process, the one that writes results."""
    return rank() == 0


def shard(count: int) -> list[int]:
    """This process's share of range(count): every world_size-th index from its rank (all of them for one process)."""
    return list(range(rank(), count, world_size()))


def gather(obj: T) -> list[T] | None:
    """[obj of process 0, obj of process 1, ...] on the main process, None on the others ([obj] for one process)."""
    if not _group():
        return [obj]
    import torch.distributed as dist

    out: list | None = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: T) -> T:
    """The main process's obj, on every process (what the others pass is ignored)."""
    if not _group():
        return obj
    import torch.distributed as dist

    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every process gets here."""
    if _group():
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (e.g. unpacks or converts files), then the others (finding them done)."""
    if not is_main():
        barrier()
    yield  # an error on the main process skips its barrier: the launcher then stops the waiting processes
    if is_main():
        barrier()


def finish() -> None:
    """At the end of a run: wait for every process, then close the process group (an open one aborts at exit)."""
    if _group():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
