"""The Spider release: spider_data.zip unpacked once into a validated folder (or an unpacked folder), its splits read.

`prepare_spider(zip_path, extract_dir)` accepts a zip (top folder `spider_data/`, any other folder, or the
files at the top level) or an already unpacked folder. A zip is unpacked into a staging folder and validated
there, then moved into `extract_dir` (a rejected zip leaves nothing behind); a marker file records the zip's
size and mtime, and a changed zip is unpacked again.
"""
from __future__ import annotations

import json
import logging
import shutil
import zipfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from scripts.databases import SpiderLayout
from scripts.errors import UserError
from scripts.example_files import read_examples, read_json

log = logging.getLogger(__name__)

MARKER_NAME = ".unpacked_from.json"
SPLIT_FILES = {"train": ("train_spider.json", "train_others.json"), "dev": ("dev.json",)}
REQUIRED_FILES = ("train_spider.json", "dev.json", "tables.json")
ROOT_SEARCH_DEPTH = 3
FIX_HINT = "get the official Spider release (https://yale-lily.github.io/spider) and point PATH_SPIDER_ZIP at it"


def prepare_spider(zip_path: Path, extract_dir: Path) -> SpiderLayout:
    """Unpack the zip into extract_dir once (or use an unpacked folder) and validate the Spider layout."""
    source = Path(zip_path)
    if source.is_dir():
        return validate_layout(find_root(source, source))
    if not source.is_file():
        raise UserError(f"Spider data not found: {source} does not exist; put spider_data.zip there, "
                        f"or set PATH_SPIDER_ZIP (or --spider-zip) to the zip or to an unpacked folder ({FIX_HINT})")
    unpack_once(source, Path(extract_dir))
    return validate_layout(find_root(Path(extract_dir), source))


def load_split(layout: SpiderLayout, split: str) -> list[dict]:
    """The examples of a split ("train": train_spider + train_others when present; "dev"), as fresh dicts."""
    if split not in layout.split_files:
        raise UserError(f"unknown Spider split {split!r}; choose from {sorted(layout.split_files)}")
    examples: list[dict] = []
    for path in layout.split_files[split]:
        examples.extend(dict(e) for e in read_examples(path, FIX_HINT))
    return examples


# --- unpacking -----------------------------------------------------------------------------------------

def unpack_once(zip_path: Path, extract_dir: Path) -> bool:
    """Unpack zip_path into extract_dir unless the marker says this same zip is there; True when it unpacked."""
    stamp = zip_stamp(zip_path)
    marker = extract_dir / MARKER_NAME
    if marker.is_file() and _read_marker(marker) == stamp:
        log.info("Spider already unpacked in %s", extract_dir)
        return False
    if extract_dir.exists() and any(extract_dir.iterdir()) and not marker.is_file():
        raise UserError(f"{extract_dir} exists and was not unpacked by this pipeline; delete it, or set "
                        f"PATH_SPIDER_ZIP to that folder to use it as it is")
    staging = extract_dir.with_name(extract_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted unpack
    created = [p for p in staging.parents if not p.exists()]  # folders to remove again if the zip is rejected
    try:
        _extract(zip_path, staging)
        validate_layout(find_root(staging, zip_path))
    except UserError as e:  # validated before it is moved into place: a rejected zip leaves nothing behind
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # nearest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise UserError(str(e).replace(f"{staging}/", f"{zip_path}: ")) from None
    (staging / MARKER_NAME).write_text(json.dumps(stamp))
    shutil.rmtree(extract_dir, ignore_errors=True)  # ours (it has a marker) or empty
    extract_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(extract_dir)
    return True


def zip_stamp(zip_path: Path) -> dict:
    """What identifies one version of the zip: name, size and modification time."""
    stat = zip_path.stat()
    return {"zip": zip_path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_marker(marker: Path) -> dict | None:
    """The stamp saved by the last unpack, or None when unreadable."""
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _extract(zip_path: Path, target: Path) -> None:
    """Extract every member (macOS metadata skipped) with a progress bar; a damaged zip is a UserError."""
    damaged = (f"{zip_path} is damaged ({{}}); download spider_data.zip again, or unzip it yourself and "
               f"set PATH_SPIDER_ZIP to the unpacked folder")
    if not zipfile.is_zipfile(zip_path):
        raise UserError(f"{zip_path} is not a zip file (or is truncated); download spider_data.zip again, "
                        f"or set PATH_SPIDER_ZIP to an unpacked Spider folder")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [m for m in archive.infolist() if not m.filename.startswith("__MACOSX/")]
            total = sum(m.file_size for m in members)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"unpacking {zip_path.name}") as bar:
                for member in members:
                    archive.extract(member, target)
                    bar.update(member.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(damaged.format(e)) from None
    except OSError as e:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"could not unpack {zip_path} into {target} ({e}); free disk space or set "
                        f"PATH_SPIDER_ZIP to an unpacked Spider folder") from None


# --- validation ----------------------------------------------------------------------------------------

def find_root(folder: Path, source: Path) -> Path:
    """The folder holding dev.json: folder itself or the shallowest one below it (first by name)."""
    for depth in range(ROOT_SEARCH_DEPTH + 1):
        pattern = "/".join(["*"] * depth + ["dev.json"])
        hits = sorted(p.parent for p in folder.glob(pattern) if "__MACOSX" not in p.parts)
        if hits:
            return hits[0]
    raise UserError(f"{source} holds no dev.json; expected the official Spider layout (train_spider.json, "
                    f"dev.json, tables.json, database/<db_id>/<db_id>.sqlite): {FIX_HINT}")


def validate_layout(root: Path) -> SpiderLayout:
    """Check the official layout and every split file's entries; return the layout."""
    for name in REQUIRED_FILES:
        if not (root / name).is_file():
            raise UserError(f"{root / name} is missing: the Spider folder needs {', '.join(REQUIRED_FILES)} "
                            f"and database/; {FIX_HINT}")
    database_dir = root / "database"
    if not database_dir.is_dir():
        raise UserError(f"{database_dir} is missing (it should hold <db_id>/<db_id>.sqlite); {FIX_HINT}")
    split_files = {
        split: [root / name for name in names if (root / name).is_file()] for split, names in SPLIT_FILES.items()
    }
    for paths in split_files.values():
        for path in paths:
            read_examples(path, FIX_HINT)
    _validate_tables(root / "tables.json")
    return SpiderLayout(root=root, database_dir=database_dir, tables_file=root / "tables.json", split_files=split_files)


def _validate_tables(path: Path) -> None:
    """tables.json must be a list of entries with a db_id."""
    data = read_json(path, FIX_HINT)
    if not isinstance(data, list) or not all(isinstance(e, dict) and "db_id" in e for e in data):
        raise UserError(f"{path} should be a JSON list of schema entries with a db_id each; {FIX_HINT}")
