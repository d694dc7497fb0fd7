"""Resumable stages: each stage's result is saved with the fingerprint of its inputs and reused when they match."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts import distributed

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able inputs (paths and other objects by their str)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageCache:
    """results/stages/<name>.json holds {"fingerprint", "result"}; a matching fingerprint skips the stage."""

    def __init__(self, folder: Path, force: bool = False) -> None:
        self.folder = folder
        self.force = force
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """Where a stage's result lives."""
        return self.folder / f"{name}.json"

    def load(self, name: str, key: str) -> Any | None:
        """The saved result of a stage for these inputs, or None (force does not hide it: see run)."""
        path = self.path(name)
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        return saved["result"] if saved.get("fingerprint") == key else None

    def save(self, name: str, key: str, result: Any) -> None:
        """Write atomically, so an interrupted write never leaves a half file."""
        write_json(self.path(name), {"fingerprint": key, "result": result})

    def run(self, name: str, key: str, compute: Callable[[], Any]) -> Any:
        """The saved result when its inputs match, else (or with force) compute, save and return it.

        force redoes the stages that run; a stage left out of --stages still hands on its saved result.
        With several processes (scripts/distributed.py) the main process decides whether the saved result is
        reused; `compute` runs on every process, the main process saves what its own `compute` returned, and
        every process gets that result.
        """
        mine = None if self.force or not distributed.is_main() else self.load(name, key)
        cached = distributed.broadcast(mine)
        if cached is not None:
            log.info("stage %s: reusing the result saved for the same inputs (%s)", name, self.path(name))
            return cached
        result = compute()
        if distributed.is_main():
            self.save(name, key, result)
        return distributed.broadcast(result)


def adapter_stamp(adapter: str | Path | None) -> list | None:
    """Names, sizes and times of an adapter's weight files (None without one), so a retrained adapter counts as new."""
    if not adapter:
        return None
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(adapter).glob("adapter_model*"))]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file, then a rename), so an interruption never leaves a half file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
