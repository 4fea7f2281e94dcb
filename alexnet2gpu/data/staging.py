"""`python -m alexnet2gpu stage`: ImageNet decoded once to the staged format (alexnet2gpu.data.staged), from
the ImageFolder tree, the official archives or Kaggle's copy (alexnet2gpu.data.archives), read in place.

Sources are split into shards of `shard_images` in listing order; worker processes decode a shard
each with the live path's `stage_image` and write it whole (`files.atomic_write`) with a record
of its rows. A stage is safe to interrupt and to run again:

- one process writes a folder at a time: an flock on OUT/.lock, which the kernel releases on any
  exit (SIGKILL included), so a second `stage` on the same --out is refused and a stale lock is none;
- the workers die with their parent (PR_SET_PDEATHSIG): a killed stage leaves nothing writing;
- a rerun keeps only the shards whose record, length and every image's CRC-32 check out, and
  stages the rest again: the result has the bytes of an uninterrupted stage;
- the index's SHA-256 goes into the manifest, which is written last.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import signal
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from alexnet2gpu import files
from alexnet2gpu.config import StageConfig
from alexnet2gpu.data import archives
from alexnet2gpu.data.archives import Listing, Sample
from alexnet2gpu.data.base import DatasetError
from alexnet2gpu.data.datasets import imagenet_dataset
from alexnet2gpu.data.images import UnreadableImage, is_ignored, stage_image
from alexnet2gpu.data.staged import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_DTYPE,
    MANIFEST,
    PLAN,
    SPLITS,
    StagedImages,
    is_staged,
    read_manifest,
    sha256,
    shard_paths,
)
from alexnet2gpu.files import atomic_write, shown
from alexnet2gpu.progress import progress_bar


@dataclass(frozen=True)
class ShardJob:
    """One shard's work: its sources, where it goes and how they are encoded."""

    folder: str  # OUT/<split>
    shard: int
    samples: list[Sample]
    config: StageConfig
    strict: bool


def encode(image: torch.Tensor, quality: int, subsampling: str) -> bytes:
    """(3, S, S) uint8 -> JPEG bytes, baseline, optimised Huffman tables (smaller, and no slower to decode)."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())  # (S, S, 3)
    pil.save(buffer, "JPEG", quality=quality, subsampling=subsampling, optimize=True)
    return buffer.getvalue()


def stage_shard(job: ShardJob) -> dict:
    """Decodes one shard's sources with the live path's function, writes their JPEGs, then the
    shard's record (.done.json), the mark that the shard is complete. Returns the record's summary."""
    data_path, done_path = shard_paths(Path(job.folder), job.shard)
    images, skipped, offset = [], [], 0
    sources: dict[str, BinaryIO] = {}

    def write(file) -> None:
        nonlocal offset
        for sample in job.samples:
            try:
                pixels = stage_image(archives.open_sample(sample, sources), job.config.size)
                blob = encode(pixels, job.config.quality, job.config.subsampling)
            except UnreadableImage as error:
                if job.strict:
                    raise DatasetError(
                        f"unreadable image {shown(sample.name)}: {error} (drop --strict to skip such images)"
                    ) from None
                skipped.append({"path": sample.name, "reason": str(error)})
                continue
            file.write(blob)
            images.append([offset, len(blob), sample.label, zlib.crc32(blob), sample.name])
            offset += len(blob)

    try:
        with atomic_write(data_path) as tmp, open(tmp, "wb") as file:
            write(file)
    finally:
        for file in sources.values():
            file.close()
    record = {"images": images, "skipped": skipped}
    with atomic_write(done_path) as tmp:
        tmp.write_text(json.dumps(record))
    return {"folder": job.folder, "sources": len(job.samples), "skipped": skipped}


def _reusable(folder: Path, shard: int, samples: list[Sample]) -> bool:
    """A shard an earlier run completed, checked rather than trusted: its record names exactly these
    sources with their labels, the data is as long as the record says and every image's CRC-32 holds."""
    data_path, done_path = shard_paths(folder, shard)
    try:
        record = json.loads(done_path.read_text())
        rows, skipped = record["images"], record["skipped"]
        names = [row[4] for row in rows] + [item["path"] for item in skipped]
        if sorted(names) != sorted(s.name for s in samples):
            return False
        labels = {s.name: s.label for s in samples}
        if any(row[2] != labels[row[4]] for row in rows):
            return False
        data = data_path.read_bytes()
        if len(data) != sum(row[1] for row in rows):
            return False
        return all(zlib.crc32(data[row[0] : row[0] + row[1]]) == row[3] for row in rows)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


# ---------------------------------------------------------------------------------------------
# what is staged, and where


def sources(paths: Sequence[Path], config: StageConfig, map_jobs: Callable = map) -> Listing:
    """The listing of --data: the official archives, Kaggle's copy or an ImageFolder tree."""
    if len(paths) == 1 and is_staged(paths[0]):
        raise DatasetError(f"{paths[0]} is a staged folder already; --data names the original ImageNet")
    missing = [p for p in paths if not p.exists()]
    if missing and len(paths) > 1:
        raise DatasetError(f"--data {missing[0]} does not exist")
    official = archives.official_files(paths)
    if official:
        return archives.list_official(official, map_jobs)
    if archives.is_kaggle(paths):
        return archives.list_kaggle(paths[0])
    if len(paths) > 1:
        raise DatasetError("--data names several paths: that is for the official archives' three files only")
    raw = paths[0]
    if not (raw / "train").is_dir():
        what = "does not exist" if not raw.exists() else "is a file" if not raw.is_dir() else "lacks train/"
        raise DatasetError(
            f"--data {raw} {what}: it names the folder of the official archives ({archives.TRAIN_TAR}, "
            f"{archives.VAL_TAR}, {archives.DEVKIT}) or those files, Kaggle's folder ({archives.KAGGLE}/) "
            "or an ImageFolder tree (train/<class>/, val/<class>/)"
        )
    folders = {split: imagenet_dataset(split, str(raw), config.size, False) for split in SPLITS}
    splits = {
        split: [Sample(os.path.relpath(p, raw), str(p), -1, -1, label) for p, label in d.samples]
        for split, d in folders.items()
    }
    train = folders["train"]
    return Listing("ImageFolder", str(raw.resolve()), train.classes, list(train.categories.names), splits)


def plan_stage(listing: Listing, config: StageConfig) -> dict:
    """The plan of a stage, what `staging.json` holds: a rerun resumes only under the same one."""
    splits = {}
    for split, samples in listing.splits.items():
        text = "\n".join(f"{s.name}\t{s.label}" for s in samples)
        splits[split] = {
            "sources": len(samples),
            "listing_sha1": hashlib.sha1(text.encode(errors="surrogateescape")).hexdigest(),
        }
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": listing.source,
        "source_kind": listing.kind,
        "stage_size": config.size,
        "quality": config.quality,
        "subsampling": config.subsampling,
        "shard_images": config.shard_images,
        "classes": listing.classes,
        "words": listing.words,
        "splits": splits,
    }


def _adopt_plan(out: Path, plan: dict) -> None:
    """Writes the plan into a new folder, or checks that an interrupted stage had the same one."""
    plan_path = out / PLAN
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            old = {}
        names = {"splits": "list of source images", "source": "source", "stage_size": "size"}
        changed = sorted(names.get(k, k) for k in plan if old.get(k) != plan[k])
        if changed:
            raise DatasetError(
                f"{out} holds a stage begun with another {', '.join(changed)}; stage into a new folder or delete {out}"
            )
        return
    if any(not is_ignored(p.name) for p in out.iterdir()):
        raise DatasetError(f"{out} is not empty and holds no stage; --out needs a new or empty folder")
    with atomic_write(plan_path) as tmp:
        tmp.write_text(json.dumps(plan, indent=1))


def _refuse_out_in_data(paths: Sequence[Path], out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file; it names the folder to stage into")
    target = out.resolve()
    for path in paths:
        if path.is_dir() and target.is_relative_to(path.resolve()):
            raise DatasetError(
                f"--out {out} is inside --data {path}: the staged shards would become part of the data; "
                "stage into a folder outside it"
            )


@contextlib.contextmanager
def holding(out: Path) -> Iterator[None]:
    """Holds OUT/.lock (an flock) while this process stages into `out` (`files.holding`): a refused start
    leaves neither its lock file nor a folder it made."""
    held = contextlib.ExitStack()
    try:
        held.enter_context(files.holding(out))  # the claim alone: errors of the stage itself pass as they are
    except OSError as error:
        raise DatasetError(f"cannot write in --out {out}: {error.strerror}; choose another folder") from None
    except files.Busy as busy:
        raise DatasetError(
            f"{out} is being staged by {busy.holder}; wait for it to end or choose another --out"
        ) from None
    with held:
        yield


# ---------------------------------------------------------------------------------------------


def stage(
    raw: str | Path | Sequence[str | Path],
    out: str | Path,
    config: StageConfig | None = None,
    *,
    workers: int = 0,
    strict: bool = False,
    progress: bool = True,
) -> dict:
    """Stages `raw` (an ImageFolder tree, Kaggle's folder, the official archives' folder, or those
    three files) into `out` and returns the manifest. Run again after any interruption it keeps the
    complete shards that verify and redoes the rest."""
    paths = [Path(p) for p in ([raw] if isinstance(raw, str | Path) else raw)]
    out, config = Path(out), config or StageConfig()
    _refuse_out_in_data(paths, out)
    with holding(out), _workers(workers) as map_jobs:
        listing = sources(paths, config, map_jobs)
        plan = plan_stage(listing, config)
        _adopt_plan(out, plan)
        if is_staged(out):
            for split in SPLITS:  # what a rerun returns is checked too: index checksums, shard lengths
                StagedImages(out, split, stage_size=config.size)
            return read_manifest(out)
        jobs, done, redone = [], 0, 0
        for split, samples in listing.splits.items():
            folder = out / split
            folder.mkdir(exist_ok=True)
            for tmp in files.leftovers(folder):  # what an interrupted stage was writing
                tmp.unlink()
            for shard, start in enumerate(range(0, len(samples), config.shard_images)):
                part = samples[start : start + config.shard_images]
                if _reusable(folder, shard, part):
                    done += len(part)
                else:
                    redone += shard_paths(folder, shard)[1].exists()
                    jobs.append(ShardJob(str(folder), shard, part, config, strict))
        total = sum(len(samples) for samples in listing.splits.values())
        bar = progress_bar(
            total=total, initial=done, unit="img", desc=f"staging ({listing.kind})", disable=not progress
        )
        if redone:
            bar.write(f"{redone} shards of an earlier run failed their checks (length, CRC-32, sources): staged again")
        _run(jobs, map_jobs, bar)
        return _finish(out, plan)


@contextlib.contextmanager
def _workers(workers: int) -> Iterator[Callable]:
    """`map_jobs(function, jobs)`, in `workers` processes (0: in this one), results in any order."""
    if not workers:
        yield map
        return
    with multiprocessing.get_context().Pool(workers, initializer=_worker_start, initargs=(os.getpid(),)) as pool:
        yield lambda function, jobs: pool.imap_unordered(function, list(jobs))


def _worker_start(parent: int) -> None:
    """A worker dies with the stage that started it (SIGKILL included): Linux's parent-death signal,
    and a check for a parent gone before it was set. One thread: one process per core already."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:
        os._exit(1)
    torch.set_num_threads(1)


def _run(jobs: list[ShardJob], map_jobs: Callable, bar: tqdm) -> None:
    """Runs the shard jobs, reporting skipped sources on the progress bar (whose rate gives the ETA)."""
    skipped = 0
    try:
        for result in map_jobs(stage_shard, jobs):
            for item in result["skipped"]:
                bar.write(f"skipped {shown(item['path'])}: {item['reason']}")
            skipped += len(result["skipped"])
            bar.update(result["sources"])
            bar.set_postfix(skipped=skipped)
    except KeyboardInterrupt:
        bar.write("interrupted: complete shards are kept; run the same command again to resume")
        raise
    finally:
        bar.close()


def _finish(out: Path, plan: dict) -> dict:
    """Each split's index and source list from the shard records, then the manifest, last."""
    manifest = {**plan, "package_version": _version(), "created": datetime.datetime.now().isoformat(timespec="seconds")}
    manifest["splits"] = {}
    for split, planned in plan["splits"].items():
        folder = out / split
        shards = -(-planned["sources"] // plan["shard_images"])
        records = [json.loads(shard_paths(folder, k)[1].read_text()) for k in range(shards)]
        rows = [(k, *row[:4]) for k, record in enumerate(records) for row in record["images"]]
        index = np.array(rows, dtype=INDEX_DTYPE) if rows else np.zeros(0, INDEX_DTYPE)
        with atomic_write(folder / "index.npy") as tmp, open(tmp, "wb") as file:
            np.save(file, index)
        with atomic_write(folder / "files.json") as tmp:
            tmp.write_text(json.dumps([row[4] for record in records for row in record["images"]]))
        manifest["splits"][split] = {
            "images": len(index),
            "sources": planned["sources"],
            "shards": shards,
            "bytes": int(index["length"].sum()),
            "index_sha256": sha256(folder / "index.npy"),
            "skipped": [item for record in records for item in record["skipped"]],
        }
    with atomic_write(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    for split in plan["splits"]:
        for done in (out / split).glob("*.done.json"):
            done.unlink()
    return manifest


def _version() -> str:
    try:
        return importlib.metadata.version("alexnet2gpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
