"""ImageNet staged once at the paper's 256x256 (P 2): `python -m alexnet2gpu stage` writes it
(alexnet2gpu.data.staging), `StagedImages` reads it; this module owns the format. A staged image
decodes several times faster than the original JPEG, which the live folder path decodes, rescales
and crops again every epoch.

A staged folder:

    manifest.json           written last: a folder without it is not (yet) a staged set
    staging.json            the plan (source, listing, size, quality): an interrupted stage resumes only under it
    train/00000.jpegs ...   shards: the images of up to `shard_images` sources, 256x256 JPEGs back to back
    train/index.npy         one row per image (INDEX_DTYPE): shard, offset, length, label, CRC-32 of its bytes;
                            its SHA-256 is in the manifest, so a flipped label is caught like a flipped pixel
    train/files.json        the source of each row, relative to the source folder or archive (for messages)
    val/...
    .lock                   an flock held by the one process that writes the folder (alexnet2gpu.data.staging)

Why this container, and the JPEG settings: docs/DATA.md, "The staged format".
"""

from __future__ import annotations

import hashlib
import json
import mmap
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from alexnet2gpu.data.base import Categories, DatasetError, SkippingDataset, imagenet_words
from alexnet2gpu.files import read_regular

FORMAT, FORMAT_VERSION = "alexnet2gpu staged JPEG", 2  # 2: the index's SHA-256 in the manifest
MANIFEST, PLAN = "manifest.json", "staging.json"
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("label", "<i4"), ("crc32", "<u4")])


MANIFEST_MAX_BYTES = 64 << 20  # a manifest lists classes, their words and counts: far less than this


def shard_paths(folder: Path, shard: int) -> tuple[Path, Path]:
    """A shard's JPEGs and, while a stage runs, its record (the mark that it is complete)."""
    return folder / f"{shard:05d}.jpegs", folder / f"{shard:05d}.done.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        manifest = json.loads(read_regular(root / MANIFEST, MANIFEST_MAX_BYTES))
        ok = manifest.get("format") == FORMAT and isinstance(manifest.get("classes"), list)
    except (OSError, ValueError, AttributeError) as error:
        raise DatasetError(f"{root / MANIFEST} is unreadable ({error}); {restage(root)}") from None
    if not ok:
        raise DatasetError(f"{root / MANIFEST} is not the manifest of a staged folder; {restage(root)}")
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{root} was staged in format version {manifest.get('version')}, this reads only "
            f"{FORMAT_VERSION}; {restage(root)}"
        )
    return manifest


def restage(root: Path, source: str = "RAW") -> str:
    return f"delete {root} and stage again (python -m alexnet2gpu stage --data {source} --out {root})"


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
        self._check_counts(folder, manifest["splits"][split])
        self.shards = [shard_paths(folder, k)[0] for k in range(manifest["splits"][split]["shards"])]
        self.index_sha256 = manifest["splits"][split].get("index_sha256")
        self.index = self._read_index(folder / "index.npy", manifest["splits"][split]["images"])
        self._check_shards()
        self._maps: dict[int, mmap.mmap] = {}
        self._files: list[str] | None = None

    def _check_counts(self, folder: Path, split: dict) -> None:
        """The manifest's counts, bounded by what is on disk before anything is sized by them: every
        shard holds an image, and every image a row of index.npy (a damaged manifest declaring millions
        of shards is refused here, not after building their list)."""
        shards, images = split.get("shards"), split.get("images")
        try:
            rows = (folder / "index.npy").stat().st_size // INDEX_DTYPE.itemsize
        except OSError:
            rows = None  # _read_index names the missing index
        counts_ok = isinstance(shards, int) and isinstance(images, int) and 0 <= shards <= max(images, 1)
        if not counts_ok:
            raise DatasetError(
                f"{self.root / MANIFEST}: {folder.name} declares {shards} shards of {images} images, which "
                f"cannot be; {restage(self.root, self.source)}"
            )
        if rows is not None and images > rows:
            raise DatasetError(
                f"{folder / 'index.npy'}: corrupt index (room for at most {rows} rows, the manifest declares "
                f"{images} images); {restage(self.root, self.source)}"
            )

    def _read_index(self, path: Path, images: int) -> np.ndarray:
        """The index, checked against the manifest's SHA-256: its labels carry no CRC of their own."""
        try:
            if sha256(path) != self.index_sha256:
                raise ValueError("its SHA-256 is not the one in manifest.json: labels or offsets were changed")
            index = np.load(path, allow_pickle=False)
            if index.dtype != INDEX_DTYPE or index.shape != (images,):
                raise ValueError(f"{index.dtype} {index.shape}, expected {images} rows of {INDEX_DTYPE}")
        except (OSError, ValueError, EOFError) as error:
            raise DatasetError(f"{path}: corrupt index ({error}); {restage(self.root, self.source)}") from None
        if len(index) and (index["label"].min() < 0 or index["label"].max() >= self.num_classes):
            raise DatasetError(f"{path}: labels outside 0..{self.num_classes - 1}; {restage(self.root, self.source)}")
        if len(index) and index["shard"].max() >= len(self.shards):
            raise DatasetError(f"{path}: rows name shards the manifest lacks; {restage(self.root, self.source)}")
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
                    f"{path}: {found}, the index says {expected[shard]:,} bytes; {restage(self.root, self.source)}"
                )

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> torch.Tensor:
        """Every image's label, from the index alone."""
        return torch.from_numpy(self.index["label"].astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}  # each worker process maps the shards itself

    def encoded(self, row: np.void) -> bytearray:
        """The stored JPEG bytes of an index row, read from its mapped shard."""
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
        data = self.encoded(row)
        if zlib.crc32(data) != int(row["crc32"]):
            self.skip(
                self.where(i),
                f"its bytes fail their CRC-32 check: the shard is damaged; {restage(self.root, self.source)}",
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
