"""What every dataset of this package is built on, and what staged folders share with the live
ones: the error a bad dataset raises, the classes as ids and words (`Categories`, stored in
checkpoints), and `SkippingDataset`, which logs and drops an unreadable image.

Its own module so that `datasets` (which reads staged folders) and `staging` (which writes them
from the live listing) both build on it without importing each other in a circle.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from alexnet2gpu.files import read_regular, shown

log = logging.getLogger("alexnet2gpu.data.datasets")


class DatasetError(RuntimeError):
    """The data is missing or malformed; the message says where and how to fix it."""


@dataclass(frozen=True)
class Categories:
    """A dataset's classes in label order. `ids` identify them (ImageNet's WordNet ids, the digits,
    Fashion-MNIST's names) and are what a checkpoint is checked against; `names` say them to a person
    (ImageNet's words where a mapping file lies beside the data, else the ids)."""

    ids: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def numbered(cls, n: int) -> Categories:
        ids = tuple(str(i) for i in range(n))
        return cls(ids, ids)

    def to_dict(self) -> dict:
        return {"ids": list(self.ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> Categories:
        return cls(tuple(d["ids"]), tuple(d["names"]))

    def short(self, label: int) -> str:
        """The first of a class's words ("tench" of "tench, Tinca tinca"), for figures."""
        return self.names[label].split(",")[0].strip()


class SkippingDataset(Dataset):
    """A dataset whose images can be unreadable: each one is logged with where it is, the reason
    and a running count, and the loader's collate drops it (the epoch order stays a function of
    the index, so a resumed run stays exact); with `strict` the first one stops the run."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped = multiprocessing.Value("i", 0)  # shared by the loader's worker processes

    def skip(self, where: str, reason: str) -> None:
        if self.strict:
            raise DatasetError(f"unreadable image {shown(where)}: {reason} (drop --strict to skip such images)")
        with self.skipped.get_lock():
            self.skipped.value += 1
            count = self.skipped.value
        log.warning("skipping unreadable image %s (%s); %d skipped so far", shown(where), reason, count)


WORD_FILES = ("synset_words.txt", "LOC_synset_mapping.txt")  # "n01440764 tench, Tinca tinca" per line
WORDS_MAX_BYTES = 16 << 20  # ImageNet's synset_words.txt holds 31 KB


def imagenet_words(root: Path, wnids: list[str]) -> list[str]:
    """Each class's words from a mapping file in `root` or the folder above it (Caffe's
    synset_words.txt, Kaggle's LOC_synset_mapping.txt); the WordNet id itself where none says."""
    words: dict[str, str] = {}
    for folder in (root, root.parent):
        for name in WORD_FILES:
            try:
                text = read_regular(folder / name, WORDS_MAX_BYTES).decode("utf-8", errors="replace")
            except FileNotFoundError:
                continue
            except OSError as error:  # a FIFO, a device, a link to /dev/zero: never read
                log.warning(
                    "ignoring %s: %s; classes are named by their WordNet ids", shown(folder / name), error.strerror
                )
                continue
            for line in text.split("\n"):  # not splitlines: a U+2028 inside a name is no line break
                wnid, _, said = line.strip().partition(" ")
                if wnid and said.strip():
                    words.setdefault(wnid, said.strip())
    return [words.get(wnid, wnid) for wnid in wnids]
