"""ImageNet as it is downloaded, listed for staging without extracting a byte: the official archives
and Kaggle's copy, besides the ImageFolder tree.

Official (image-net.org), a folder holding the three files or the files named one by one:

    ILSVRC2012_img_train.tar      1,000 inner tars, n01440764.tar holding n01440764_*.JPEG
    ILSVRC2012_img_val.tar        50,000 flat files, ILSVRC2012_val_00000001.JPEG ...
    ILSVRC2012_devkit_t12.tar.gz  data/ILSVRC2012_validation_ground_truth.txt: one ILSVRC2012_ID per val image
                                  data/meta.mat: ILSVRC2012_ID -> WordNet id and words (the `synsets` struct)

Kaggle (imagenet-object-localization-challenge): ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG,
ILSVRC/Data/CLS-LOC/val/*.JPEG, LOC_val_solution.csv (ImageId, "wnid x y x y ...") and
LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca").

Labels are the sorted-WordNet order, ImageFolder's and Caffe's. The devkit's ILSVRC2012_IDs are
another order (ID 1 is n02119789, kit fox): a val image's label goes ID -> WordNet id (meta.mat) ->
its place among the sorted ids, never the ID itself. Images are listed in the order the extracted
ImageFolder tree lists them (class, then file name), so a stage from the archives writes the same
bytes as a stage from that tree. An image in an uncompressed tar is one contiguous byte range; a
`Sample` names that range, which a staging worker reads with one seek.
"""

from __future__ import annotations

import csv
import io
import os
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

from alexnet2gpu.data.base import DatasetError, imagenet_words
from alexnet2gpu.data.datasets import class_names, list_images
from alexnet2gpu.data.images import is_ignored, is_image_name
from alexnet2gpu.files import read_regular, shown

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
GROUND_TRUTH, META = "data/ILSVRC2012_validation_ground_truth.txt", "data/meta.mat"
KAGGLE = Path("ILSVRC/Data/CLS-LOC")
KAGGLE_VAL, KAGGLE_WORDS = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.")
# Bounds far above what the files hold: the devkit has a few dozen files, a meta.mat of megabytes and
# a ground truth of 50,000 short lines; anything far larger is damage or hostile, refused before it is read.
DEVKIT_MAX_MEMBERS = 10_000
META_MAX_BYTES, META_MAX_INFLATED, TRUTH_MAX_BYTES = 64 << 20, 256 << 20, 16 << 20


class Sample(NamedTuple):
    """One source image: `name` says where it is (relative to the source, for messages); its bytes
    are the file `path`, or with `offset` >= 0 the `size` bytes at `offset` in the archive `path`."""

    name: str
    path: str
    offset: int
    size: int
    label: int


class Listing(NamedTuple):
    """A source as staging sees it: classes (sorted WordNet ids), their words and each split's samples."""

    kind: str  # "official archives", "Kaggle", "ImageFolder"
    source: str  # for the plan and messages: the folder, or the files
    classes: list[str]
    words: list[str]
    splits: dict[str, list[Sample]]


def open_sample(sample: Sample, files: dict[str, BinaryIO]) -> str | bytes:
    """A sample's file path, or its bytes read from the archive (`files` keeps the archives open)."""
    if sample.offset < 0:
        return sample.path
    if sample.path not in files:
        files[sample.path] = open(sample.path, "rb")  # noqa: SIM115 - closed by the caller, with the others
    file = files[sample.path]
    file.seek(sample.offset)
    return file.read(sample.size)


# ---------------------------------------------------------------------------------------------
# which layout --data names


def official_files(paths: Sequence[Path]) -> dict[str, Path] | None:
    """The three official files, from one folder holding them or from the files themselves; None
    when `paths` is not that layout (an ImageFolder tree, Kaggle's)."""
    if len(paths) == 1 and paths[0].is_dir():
        if not any((paths[0] / name).exists() for name in (TRAIN_TAR, VAL_TAR, DEVKIT)):
            return None
        candidates = sorted(p for p in paths[0].iterdir() if not is_ignored(p.name))
    elif len(paths) == 1 and not paths[0].name.endswith((".tar", ".tar.gz", ".tgz")):
        return None
    else:
        candidates = list(paths)
    found: dict[str, Path] = {}
    for path in candidates:
        name = path.name
        role = (
            "train"
            if "img_train" in name and name.endswith(".tar")
            else "val"
            if "img_val" in name and name.endswith(".tar")
            else "devkit"
            if "devkit" in name and name.endswith((".tar.gz", ".tgz"))
            else None
        )
        if role is None:
            if len(paths) > 1:
                raise DatasetError(f"--data {path}: not one of {TRAIN_TAR}, {VAL_TAR}, {DEVKIT}")
            continue
        if role in found:
            raise DatasetError(f"--data names two {role} archives: {found[role]} and {path}; keep one")
        found[role] = path
    missing = [name for role, name in (("train", TRAIN_TAR), ("val", VAL_TAR), ("devkit", DEVKIT)) if role not in found]
    if missing:
        where = paths[0] if len(paths) == 1 else "the files named by --data"
        raise DatasetError(
            f"{where} lacks {', '.join(missing)}: staging the official archives needs the train tar, the val tar and "
            "the devkit (image-net.org, ILSVRC2012)"
        )
    for path in found.values():
        if not path.is_file():
            raise DatasetError(f"{path} is not a file")
    return found


def is_kaggle(paths: Sequence[Path]) -> bool:
    return len(paths) == 1 and (paths[0] / KAGGLE / "train").is_dir()


# ---------------------------------------------------------------------------------------------
# the official archives


def read_devkit(devkit: Path) -> tuple[dict[int, str], dict[str, str], list[int]]:
    """(ILSVRC2012_ID -> WordNet id of the 1,000 leaf classes, WordNet id -> words, each val
    image's ILSVRC2012_ID in file order) from the devkit's meta.mat and ground-truth file."""
    import scipy.io  # only the official archives need it

    try:
        with tarfile.open(devkit, "r:*") as tar:
            members = {}
            for count, member in enumerate(tar, 1):
                if count > DEVKIT_MAX_MEMBERS:
                    raise DatasetError(f"{devkit} holds more than {DEVKIT_MAX_MEMBERS} files: not ILSVRC2012's devkit")
                if member.isfile():
                    members.setdefault(member.name.split("/", 1)[-1], []).append(member)
            if META not in members or GROUND_TRUTH not in members:
                lacks = [name for name in (META, GROUND_TRUTH) if name not in members]
                raise DatasetError(f"{devkit} lacks {' and '.join(lacks)}: is it ILSVRC2012's devkit (t12)?")
            for name, limit in ((META, META_MAX_BYTES), (GROUND_TRUTH, TRUTH_MAX_BYTES)):
                if len(members[name]) > 1:
                    raise DatasetError(f"{devkit} holds {name} {len(members[name])} times; download it again")
                if members[name][0].size > limit:
                    raise DatasetError(
                        f"{devkit}: {name} holds {members[name][0].size:,} bytes, more than the {limit:,} the "
                        "devkit's has room for; download it again"
                    )
            meta = tar.extractfile(members[META][0]).read()
            truth = tar.extractfile(members[GROUND_TRUTH][0]).read().decode()
        check_mat_inflates(meta, devkit)
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets.ravel() if int(s["num_children"]) == 0]
        ids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        words = {str(s["WNID"]): str(s["words"]) for s in leaves}
        ground_truth = [int(line) for line in truth.split()]
    except NotImplementedError:  # scipy reads MAT v4 to v7; v7.3 is HDF5
        raise DatasetError(
            f"{devkit}: its {META} is a MATLAB v7.3 (HDF5) file, not the devkit's v5 meta.mat; download it again"
        ) from None
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError, EOFError, IndexError) as error:
        raise DatasetError(
            f"{devkit}: unreadable devkit ({type(error).__name__}: {error}); download it again"
        ) from None
    return ids, words, ground_truth


def check_mat_inflates(mat: bytes, devkit: Path) -> None:
    """Refuse a MAT-file (v5) whose compressed elements inflate past META_MAX_INFLATED in all, before
    scipy inflates them: a few kilobytes of zlib can hold gigabytes. Each element is a tag (type, size)
    and its bytes; type 15 is zlib-compressed. Inflated here with a bound, then dropped."""
    position, total = 128, 0  # past the text header, whose last two bytes say the byte order
    order = ">" if mat[126:128] == b"MI" else "<"
    while position + 8 <= len(mat):
        kind, size = struct.unpack_from(f"{order}II", mat, position)
        if kind == 15:  # miCOMPRESSED
            inflate = zlib.decompressobj()
            try:
                total += len(inflate.decompress(mat[position + 8 : position + 8 + size], META_MAX_INFLATED - total + 1))
            except zlib.error:
                return  # scipy's own error names the damage
            if total > META_MAX_INFLATED:
                raise DatasetError(
                    f"{devkit}: {META} inflates to more than {META_MAX_INFLATED:,} bytes, far more than the "
                    "devkit's: download it again"
                )
        position += 8 + size + (-size % 8 if kind != 15 else 0)


class _Window(io.RawIOBase):
    """`size` bytes of `file` from `start`, as a file of their own: an inner tar read in place."""

    def __init__(self, file: BinaryIO, start: int, size: int) -> None:
        self.file, self.start, self.size, self.position = file, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.position))
        self.file.seek(self.start + self.position)
        data = self.file.read(n)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def _images_in_tar(tar: tarfile.TarFile, where: str, base: int = 0) -> list[tuple[str, int, int]]:
    """(file name, offset of its bytes, size) of the images in a tar, sorted by name as a folder
    listing is; tool leftovers are skipped, any other non-image is an error (as in a folder)."""
    found, seen = [], set()
    for member in tar:
        name = member.name.rsplit("/", 1)[-1]
        if not member.isfile() or is_ignored(name):
            continue
        check_member_name(member.name, where)
        if not is_image_name(name):
            raise DatasetError(f"{where}/{member.name} is not an image (by its extension); is the archive complete?")
        if name in seen:
            raise DatasetError(f"{where} holds {name} twice; download the archive again")
        seen.add(name)
        found.append((name, base + member.offset_data, member.size))
    return sorted(found)


def check_member_name(name: str, where: str) -> None:
    """Refuse an archive member whose name is absolute or climbs (`/x`, `../x`): no archive of ImageNet
    has one, and staging it would take a file from outside the dataset's own tree as one of its images."""
    if name.startswith("/") or ".." in name.split("/"):
        raise DatasetError(f"{where}: member {name!r} is absolute or climbs out of the archive; download it again")


def list_inner_tar(job: tuple[str, str, int, int]) -> tuple[str, list[tuple[str, int, int]]]:
    """One class of the train archive: its inner tar's images as byte ranges of the outer archive.
    Run in the staging workers, one inner tar each."""
    outer, name, start, size = job
    with open(outer, "rb") as file:
        reader = io.BufferedReader(_Window(file, start, size))
        try:
            with tarfile.open(fileobj=reader, mode="r:") as tar:
                return name, _images_in_tar(tar, f"{Path(outer).name}/{name}", start)
        except tarfile.TarError as error:
            raise DatasetError(f"{outer}: {name} is not a readable tar ({error}); download it again") from None


def list_official(files: dict[str, Path], map_jobs: Callable) -> Listing:
    """The official archives' listing; `map_jobs(function, jobs)` lists the inner tars (in the workers)."""
    ids, words, ground_truth = read_devkit(files["devkit"])
    train, val = files["train"], files["val"]
    try:
        with tarfile.open(train, "r:") as tar:
            inner = [(str(train), m.name, m.offset_data, m.size) for m in tar if m.isfile() and m.name.endswith(".tar")]
        with tarfile.open(val, "r:") as tar:
            val_images = _images_in_tar(tar, val.name)
    except tarfile.TarError as error:
        raise DatasetError(f"{error}: {train} or {val} is not a readable tar; download it again") from None
    for _, name, _, _ in inner:
        check_member_name(name, train.name)
    stems: dict[str, str] = {}
    for _, name, _, _ in inner:
        if Path(name).stem in stems:
            raise DatasetError(
                f"{train.name} holds class {Path(name).stem} twice ({stems[Path(name).stem]} and {name}): every label "
                "after it would shift; download the archive again"
            )
        stems[Path(name).stem] = name
    classes = sorted(stems)
    if not classes:
        raise DatasetError(f"{train} holds no class tars (n01440764.tar ...)")
    unknown = sorted(set(classes) - set(ids.values()))
    if unknown:
        raise DatasetError(f"{train} holds classes the devkit's meta.mat lacks: {unknown[:5]}; another year's devkit?")
    label = {wnid: k for k, wnid in enumerate(classes)}
    by_class = dict(map_jobs(list_inner_tar, inner))
    samples = []
    for _, name, _, _ in sorted(inner, key=lambda job: Path(job[1]).stem):
        images = by_class[name]
        if not images:
            raise DatasetError(f"{train.name}/{name} holds no images; download the archive again")
        samples += [Sample(f"{train.name}/{name}/{f}", str(train), o, s, label[Path(name).stem]) for f, o, s in images]
    numbers = sorted(int(m[1]) for m in (VAL_NAME.match(name) for name, _, _ in val_images) if m)
    if numbers != list(range(1, len(ground_truth) + 1)):
        absent = sorted(set(range(1, len(ground_truth) + 1)) - set(numbers))
        detail = f"ILSVRC2012_val_{absent[0]:08d} ... absent" if absent else "images the ground truth has no line for"
        raise DatasetError(
            f"{val.name} holds {len(val_images)} images, the devkit's ground truth names {len(ground_truth)} "
            f"({detail}): each val image needs its line; download the val archive (or the devkit) again"
        )
    val_samples = []
    for name, offset, size in val_images:
        match = VAL_NAME.match(name)
        if not match or not 1 <= int(match[1]) <= len(ground_truth):
            raise DatasetError(f"{val.name}/{name}: no line of the devkit's ground truth names its class")
        number = ground_truth[int(match[1]) - 1]
        wnid = ids.get(number)
        if wnid is None:
            raise DatasetError(
                f"{val.name}/{name}: the devkit's ground truth gives it class {number}, which its meta.mat does not "
                f"list (ILSVRC2012_IDs {min(ids)} to {max(ids)}); download the devkit again"
            )
        if wnid not in label:
            raise DatasetError(f"{val.name}/{name}: its class ({wnid}) is not among the train archive's classes")
        val_samples.append(Sample(f"{val.name}/{name}", str(val), offset, size, label[wnid]))
    val_samples.sort(key=lambda s: (s.label, s.name))  # as val/<wnid>/<file> lists them
    source = " ".join(str(p.resolve()) for p in (train, val, files["devkit"]))
    return Listing(
        "official archives", source, classes, [words[c] for c in classes], {"train": samples, "val": val_samples}
    )


# ---------------------------------------------------------------------------------------------
# Kaggle's copy


# LOC_val_solution.csv lists 50,000 images with their boxes in a few MB; a file far past that is not it
CSV_LIMIT = 256 << 20


def list_kaggle(root: Path) -> Listing:
    train, val = root / KAGGLE / "train", root / KAGGLE / "val"
    classes = class_names(train)
    if not classes:
        raise DatasetError(f"{train} has no class folders")
    label = {wnid: k for k, wnid in enumerate(classes)}
    samples = [Sample(os.path.relpath(p, root), str(p), -1, -1, y) for p, y in list_images(train, classes)]
    solution = root / KAGGLE_VAL
    try:  # never a FIFO (its read would wait) or a device; a listing of 50,000 rows is a few MB
        text = read_regular(solution, limit=CSV_LIMIT).decode("utf-8-sig")
        rows = {
            row["ImageId"]: (row["PredictionString"] or "").split()[0:1]
            for row in csv.DictReader(io.StringIO(text, newline=""))
        }
        files = {p.stem: p for p in val.iterdir() if not is_ignored(p.name)}
    except UnicodeDecodeError as error:
        raise DatasetError(f"{shown(solution)} is not UTF-8 text (byte {error.start}); download it again") from None
    except (OSError, KeyError, csv.Error) as error:
        raise DatasetError(f"{shown(root)}: cannot read Kaggle's {KAGGLE_VAL} or {shown(val)} ({error})") from None
    val_samples = []
    for stem, path in sorted(files.items()):
        wnid = (rows.get(stem) or [None])[0]
        if wnid not in label:
            what = f"its class {wnid} is not among train/'s" if wnid else f"{KAGGLE_VAL} has no class for it"
            raise DatasetError(f"{path}: {what}; is the download complete?")
        val_samples.append(Sample(os.path.relpath(path, root), str(path), -1, -1, label[wnid]))
    missing = sorted(set(rows) - set(files))
    if missing:
        raise DatasetError(f"{val} lacks {len(missing)} images that {KAGGLE_VAL} lists ({missing[0]} ...)")
    val_samples.sort(key=lambda s: (s.label, Path(s.name).name))
    words = imagenet_words(root, classes)  # LOC_synset_mapping.txt
    return Listing("Kaggle", str(root.resolve()), classes, words, {"train": samples, "val": val_samples})
