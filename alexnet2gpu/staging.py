"""ImageNet staged once at the paper's 256x256 (P 2): `python -m alexnet2gpu stage` writes it,
`StagedImages` reads it. A staged image decodes several times faster than the original JPEG,
which the live folder path decodes, rescales and crops again every epoch.

A staged folder:

    manifest.json           written last: a folder without it is not (yet) a staged set
    staging.json            the plan (source, listing, size, quality): an interrupted stage resumes only under it
    train/00000.jpegs ...   shards: the images of up to `shard_images` sources, 256x256 JPEGs back to back
    train/index.npy         one row per image (INDEX_DTYPE): shard, offset, length, label, CRC-32 of its bytes
    train/files.json        the source of each row, relative to the source folder (for messages)
    val/...

Why this container: a run reads its images in an order that is a function of (seed, epoch), and
a resumed run must read the same images from the same batch on (exact resume), so every image must
be reachable by its index. Shards of plain JPEGs and an offset table give that with one memory map
per shard and no new dependency. Considered: WebDataset (tar shards) is read as a stream and
shuffled through a buffer, so an epoch's order is not a function of the index; FFCV's .beton
files have random access and fast decoding but bring numba and a loader of their own in place of
torch's DataLoader and this package's batched pipeline; LMDB gives random access too, through a
B-tree and a C library, for what an offset table does here.

Decoding is torchvision's `decode_jpeg` (libjpeg-turbo on the CPU, nvJPEG on CUDA). torchvision 0.29
deprecates its image codecs in favour of TorchCodec; they remain in every version setup.cfg allows.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import io
import json
import mmap
import multiprocessing
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from tqdm import tqdm

from alexnet2gpu.config import StageConfig
from alexnet2gpu.datasets import (
    Categories,
    DatasetError,
    ImageFolderStaged,
    SkippingDataset,
    imagenet_dataset,
    imagenet_words,
)
from alexnet2gpu.images import UnreadableImage, is_ignored, stage_image

FORMAT, FORMAT_VERSION = "alexnet2gpu staged JPEG", 1
MANIFEST, PLAN = "manifest.json", "staging.json"
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("label", "<i4"), ("crc32", "<u4")])


def is_staged(root: Path) -> bool:
    return (root / MANIFEST).is_file()


def refuse_unfinished(root: Path) -> None:
    """A folder with a staging plan and no manifest is a stage that was interrupted: say so."""
    if (root / PLAN).is_file() and not is_staged(root):
        raise DatasetError(
            f"{root} holds a stage that did not finish (no {MANIFEST}); run the same "
            f"`python -m alexnet2gpu stage --data RAW --out {root}` again to complete it"
        )


def read_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        ok = manifest.get("format") == FORMAT and isinstance(manifest.get("classes"), list)
    except (OSError, ValueError, AttributeError) as error:
        raise DatasetError(f"{root / MANIFEST} is unreadable ({error}); {_restage(root)}") from None
    if not ok:
        raise DatasetError(f"{root / MANIFEST} is not the manifest of a staged folder; {_restage(root)}")
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{root} was staged in format version {manifest.get('version')}, this reads only "
            f"{FORMAT_VERSION}; {_restage(root)}"
        )
    return manifest


def _restage(root: Path, source: str = "RAW") -> str:
    return f"delete {root} and stage again (python -m alexnet2gpu stage --data {source} --out {root})"


# ---------------------------------------------------------------------------------------------
# writing


@dataclass(frozen=True)
class ShardJob:
    """One shard's work: its sources, where it goes and how they are encoded."""

    folder: str  # OUT/<split>
    shard: int
    samples: list[tuple[str, int]]  # (path, label)
    raw: str
    config: StageConfig
    strict: bool


def encode(image: torch.Tensor, quality: int, subsampling: str) -> bytes:
    """(3, S, S) uint8 -> JPEG bytes, baseline, optimised Huffman tables (smaller, and no slower to decode)."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())  # (S, S, 3)
    pil.save(buffer, "JPEG", quality=quality, subsampling=subsampling, optimize=True)
    return buffer.getvalue()


def _shard_paths(folder: Path, shard: int) -> tuple[Path, Path]:
    return folder / f"{shard:05d}.jpegs", folder / f"{shard:05d}.done.json"


def _write_atomically(path: Path, write) -> None:
    """`write(file)` into PATH.tmp, flushed to disk, then renamed: PATH is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def stage_shard(job: ShardJob) -> dict:
    """Decodes one shard's sources with the live path's function, writes their JPEGs, then the
    shard's record (.done.json), the mark that the shard is complete. Returns the record's summary."""
    data_path, done_path = _shard_paths(Path(job.folder), job.shard)
    images, skipped, offset = [], [], 0

    def write(file) -> None:
        nonlocal offset
        for path, label in job.samples:
            source = os.path.relpath(path, job.raw)
            try:
                blob = encode(stage_image(path, job.config.size), job.config.quality, job.config.subsampling)
            except UnreadableImage as error:
                if job.strict:
                    raise DatasetError(
                        f"unreadable image {path}: {error} (drop --strict to skip such images)"
                    ) from None
                skipped.append({"path": source, "reason": str(error)})
                continue
            file.write(blob)
            images.append([offset, len(blob), label, zlib.crc32(blob), source])
            offset += len(blob)

    _write_atomically(data_path, write)
    record = {"images": images, "skipped": skipped}
    _write_atomically(done_path, lambda file: file.write(json.dumps(record).encode()))
    return {"folder": job.folder, "sources": len(job.samples), "skipped": skipped}


def _complete(folder: Path, shard: int) -> bool:
    """A shard whose record exists and whose data is exactly as long as the record says."""
    data_path, done_path = _shard_paths(folder, shard)
    try:
        record = json.loads(done_path.read_text())
        return data_path.stat().st_size == sum(row[1] for row in record["images"])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def plan_stage(raw: Path, config: StageConfig) -> tuple[dict, dict]:
    """The plan of a stage (what `staging.json` holds) and each split's sources, listed with the
    live path's rules (class folders from train/, tool leftovers ignored)."""
    if is_staged(raw):
        raise DatasetError(f"{raw} is a staged folder already; --data names the original ImageFolder tree")
    sources: dict[str, ImageFolderStaged] = {
        split: imagenet_dataset(split, str(raw), config.size, False) for split in SPLITS
    }
    splits = {}
    for split, dataset in sources.items():
        listing = "\n".join(f"{os.path.relpath(p, raw)}\t{label}" for p, label in dataset.samples)
        splits[split] = {"sources": len(dataset), "listing_sha1": hashlib.sha1(listing.encode()).hexdigest()}
    plan = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": str(raw.resolve()),
        "stage_size": config.size,
        "quality": config.quality,
        "subsampling": config.subsampling,
        "shard_images": config.shard_images,
        "classes": sources["train"].classes,
        "words": list(sources["train"].categories.names),
        "splits": splits,
    }
    return plan, {split: [(str(p), label) for p, label in d.samples] for split, d in sources.items()}


def _adopt_plan(out: Path, plan: dict) -> None:
    """Writes the plan into a new folder, or checks that an interrupted stage had the same one."""
    plan_path = out / PLAN
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            old = {}
        names = {"splits": "list of source images", "source": "source folder", "stage_size": "size"}
        changed = sorted(names.get(k, k) for k in plan if old.get(k) != plan[k])
        if changed:
            raise DatasetError(
                f"{out} holds a stage begun with another {', '.join(changed)}; stage into a new folder or delete {out}"
            )
        return
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file; it names the folder to stage into")
    if out.exists() and any(not is_ignored(p.name) for p in out.iterdir()):
        raise DatasetError(f"{out} is not empty and holds no stage; --out needs a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(plan_path, lambda file: file.write(json.dumps(plan, indent=1).encode()))


def stage(
    raw: str | Path,
    out: str | Path,
    config: StageConfig | None = None,
    *,
    workers: int = 0,
    strict: bool = False,
    progress: bool = True,
) -> dict:
    """Stages the ImageFolder tree `raw` into `out` and returns the manifest. An interrupted stage
    run again with the same arguments keeps its complete shards and redoes the rest."""
    raw, out, config = Path(raw), Path(out), config or StageConfig()
    plan, listings = plan_stage(raw, config)
    _adopt_plan(out, plan)
    if is_staged(out):
        return read_manifest(out)
    jobs, done = [], 0
    for split, samples in listings.items():
        folder = out / split
        folder.mkdir(exist_ok=True)
        for tmp in folder.glob("*.tmp"):  # what an interrupted stage was writing
            tmp.unlink()
        for shard, start in enumerate(range(0, len(samples), config.shard_images)):
            part = samples[start : start + config.shard_images]
            if _complete(folder, shard):
                done += len(part)
            else:
                jobs.append(ShardJob(str(folder), shard, part, str(raw), config, strict))
    total = sum(len(samples) for samples in listings.values())
    _run(jobs, workers, tqdm(total=total, initial=done, unit="img", desc="staging", disable=not progress))
    return _finish(out, plan)


def _run(jobs: list[ShardJob], workers: int, bar: tqdm) -> None:
    """Runs the shard jobs in `workers` processes (0: in this one), reporting skipped sources."""
    skipped = 0

    def report(result: dict) -> None:
        nonlocal skipped
        for item in result["skipped"]:
            bar.write(f"skipped {item['path']}: {item['reason']}")
        skipped += len(result["skipped"])
        bar.update(result["sources"])
        bar.set_postfix(skipped=skipped)

    try:
        if workers and len(jobs) > 1:
            with multiprocessing.get_context().Pool(min(workers, len(jobs)), initializer=_one_thread) as pool:
                for result in pool.imap_unordered(stage_shard, jobs):
                    report(result)
        else:
            for job in jobs:
                report(stage_shard(job))
    except KeyboardInterrupt:
        bar.write("interrupted: complete shards are kept; run the same command again to resume")
        raise
    finally:
        bar.close()


def _one_thread() -> None:
    torch.set_num_threads(1)  # one process per core already


def _finish(out: Path, plan: dict) -> dict:
    """Each split's index and source list from the shard records, then the manifest, last."""
    manifest = {**plan, "package_version": _version(), "created": datetime.datetime.now().isoformat(timespec="seconds")}
    manifest["splits"] = {}
    for split, planned in plan["splits"].items():
        folder = out / split
        shards = -(-planned["sources"] // plan["shard_images"])
        records = [json.loads(_shard_paths(folder, k)[1].read_text()) for k in range(shards)]
        rows = [(k, *row[:4]) for k, record in enumerate(records) for row in record["images"]]
        index = np.array(rows, dtype=INDEX_DTYPE) if rows else np.zeros(0, INDEX_DTYPE)
        _write_atomically(folder / "index.npy", lambda file, index=index: np.save(file, index))
        files = [row[4] for record in records for row in record["images"]]
        _write_atomically(folder / "files.json", lambda file, files=files: file.write(json.dumps(files).encode()))
        manifest["splits"][split] = {
            "images": len(index),
            "sources": planned["sources"],
            "shards": shards,
            "bytes": int(index["length"].sum()),
            "skipped": [item for record in records for item in record["skipped"]],
        }
    _write_atomically(out / MANIFEST, lambda file: file.write(json.dumps(manifest, indent=1).encode()))
    for split in plan["splits"]:
        for done in (out / split).glob("*.done.json"):
            done.unlink()
    return manifest


def _version() -> str:
    try:
        return importlib.metadata.version("alexnet2gpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


# ---------------------------------------------------------------------------------------------
# reading


class StagedImages(SkippingDataset):
    """One split of a staged folder: uint8 (3, 256, 256) images decoded with torchvision's
    decode_jpeg from memory-mapped shards, in the loader's worker processes. With `gpu_decode`
    the workers hand over the encoded bytes and `decode_batch` decodes a whole batch on CUDA."""

    def __init__(
        self, root: Path, split: str, *, stage_size: int = 256, strict: bool = False, gpu_decode: bool = False
    ) -> None:
        super().__init__(strict)
        manifest = read_manifest(root)
        self.root, self.source = root, manifest["source"]
        if manifest["stage_size"] != stage_size:
            raise DatasetError(
                f"{root} holds {manifest['stage_size']}x{manifest['stage_size']} images, the run asks for "
                f"stage_size={stage_size}; stage the source again at that size, or keep {manifest['stage_size']}"
            )
        if gpu_decode and not torch.cuda.is_available():
            raise DatasetError("GPU decoding needs a CUDA device and this machine has none; drop --gpu-decode")
        self.classes, self.stage_size = manifest["classes"], stage_size
        words = manifest.get("words") or imagenet_words(root, self.classes)
        self.categories = Categories(tuple(self.classes), tuple(words))
        self.num_classes, self.channels, self.name = len(self.classes), 3, f"imagenet staged ({root / split})"
        self.decode_device = torch.device("cuda") if gpu_decode else None
        folder = root / split
        self.shards = [_shard_paths(folder, k)[0] for k in range(manifest["splits"][split]["shards"])]
        self.index = self._read_index(folder / "index.npy", manifest["splits"][split]["images"])
        self._check_shards()
        self._maps: dict[int, mmap.mmap] = {}
        self._files: list[str] | None = None

    def _read_index(self, path: Path, images: int) -> np.ndarray:
        try:
            index = np.load(path, allow_pickle=False)
            if index.dtype != INDEX_DTYPE or index.shape != (images,):
                raise ValueError(f"{index.dtype} {index.shape}, expected {images} rows of {INDEX_DTYPE}")
        except (OSError, ValueError, EOFError) as error:
            raise DatasetError(f"{path}: corrupt index ({error}); {_restage(self.root, self.source)}") from None
        if len(index) and (index["label"].min() < 0 or index["label"].max() >= self.num_classes):
            raise DatasetError(f"{path}: labels outside 0..{self.num_classes - 1}; {_restage(self.root, self.source)}")
        if len(index) and index["shard"].max() >= len(self.shards):
            raise DatasetError(f"{path}: rows name shards the manifest lacks; {_restage(self.root, self.source)}")
        return index

    def _check_shards(self) -> None:
        """Every shard exists and is exactly as long as its rows say (a truncated copy is caught here)."""
        expected = np.zeros(len(self.shards), dtype=np.int64)
        np.maximum.at(
            expected,
            self.index["shard"].astype(np.int64),
            (self.index["offset"] + self.index["length"]).astype(np.int64),
        )
        for shard, path in enumerate(self.shards):
            size = path.stat().st_size if path.is_file() else None
            if size != expected[shard]:
                found = "missing" if size is None else f"{size:,} bytes"
                raise DatasetError(
                    f"{path}: {found}, the index says {expected[shard]:,} bytes; {_restage(self.root, self.source)}"
                )

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> torch.Tensor:
        """Every image's label, from the index alone."""
        return torch.from_numpy(self.index["label"].astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}  # each worker process maps the shards itself

    def _bytes(self, row: np.void) -> bytearray:
        shard = int(row["shard"])
        if shard not in self._maps:
            with open(self.shards[shard], "rb") as file:
                self._maps[shard] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        start = int(row["offset"])
        with memoryview(self._maps[shard]) as view:
            return bytearray(view[start : start + int(row["length"])])

    def where(self, i: int) -> str:
        if self._files is None:
            try:
                self._files = json.loads((self.shards[0].parent / "files.json").read_text())
            except (OSError, ValueError):
                self._files = []
        source = self._files[i] if i < len(self._files) else "unknown"
        return f"{self.shards[int(self.index[i]['shard'])]} row {i} (staged from {source})"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        row = self.index[i]
        data = self._bytes(row)
        if zlib.crc32(data) != int(row["crc32"]):
            self.skip(
                self.where(i),
                f"its bytes fail their CRC-32 check: the shard is damaged; {_restage(self.root, self.source)}",
            )
            return None
        encoded = torch.frombuffer(data, dtype=torch.uint8)
        if self.decode_device is not None:
            return encoded, int(row["label"])
        image = self._decode(encoded, lambda: self.where(i))
        return None if image is None else (image, int(row["label"]))

    def _decode(self, encoded: torch.Tensor, where: Callable[[], str]) -> torch.Tensor | None:
        try:
            image = decode_jpeg(encoded, mode=ImageReadMode.RGB)  # (3, 256, 256)
        except RuntimeError as error:
            self.skip(where(), f"decode_jpeg: {' '.join(str(error).split())}")
            return None
        if image.shape != (3, self.stage_size, self.stage_size):
            self.skip(where(), f"decodes to {tuple(image.shape)}, not (3, {self.stage_size}, {self.stage_size})")
            return None
        return image

    def decode_batch(self, encoded: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of encoded images -> uint8 (N, 3, 256, 256) on the GPU, in one call; a batch that
        fails there is decoded image by image on the CPU, skipping what does not decode."""
        try:
            return torch.stack(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.decode_device)), labels
        except RuntimeError:
            images = [self._decode(e, lambda: f"an image of a batch from {self.name}") for e in encoded]
            keep = [k for k, image in enumerate(images) if image is not None]
            if not keep:
                return torch.empty(0, 3, 0, 0, dtype=torch.uint8), labels[:0]
            return torch.stack([images[k] for k in keep]).to(self.decode_device), labels[keep]
