"""ImageNet as it is downloaded, in miniature: the official archives (a train tar of per-class tars, a
flat val tar, the devkit with a meta.mat in the devkit's structure), Kaggle's layout, and the
ImageFolder tree they extract to, all holding the same few small images under the real names.

The devkit's ILSVRC2012_IDs are deliberately not the sorted-WordNet order (as in the real devkit,
where ID 1 is n02119789): a val label taken from the ID itself would be wrong.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from builders.image_trees import photo

WORDS = {
    "n01440764": "tench, Tinca tinca",
    "n01443537": "goldfish, Carassius auratus",
    "n01484850": "great white shark",
}
CLASSES = sorted(WORDS)
IDS = {1: "n01484850", 2: "n01440764", 3: "n01443537"}  # ILSVRC2012_ID -> WordNet id: not sorted
VAL_CLASSES = ["n01443537", "n01484850", "n01440764", "n01484850", "n01443537", "n01440764"]  # val image k+1's class


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo(seed, 40 + 8 * (seed % 3), 32 + 4 * (seed % 5))).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def images(per_class: int = 3) -> tuple[dict[str, dict[str, bytes]], dict[str, tuple[str, bytes]]]:
    """(class -> file name -> JPEG bytes) for train; (file name -> (class, bytes)) for val."""
    train = {c: {f"{c}_{j + 1}.JPEG": jpeg(10 * k + j) for j in range(per_class)} for k, c in enumerate(CLASSES)}
    val = {f"ILSVRC2012_val_{k + 1:08d}.JPEG": (c, jpeg(100 + k)) for k, c in enumerate(VAL_CLASSES)}
    return train, val


def image_folder(root: Path) -> Path:
    """The extracted tree: train/<wnid>/, val/<wnid>/ (val sorted into classes), synset_words.txt beside."""
    train, val = images()
    for cls, files in train.items():
        for name, data in files.items():
            (root / "train" / cls).mkdir(parents=True, exist_ok=True)
            (root / "train" / cls / name).write_bytes(data)
    for name, (cls, data) in val.items():
        (root / "val" / cls).mkdir(parents=True, exist_ok=True)
        (root / "val" / cls / name).write_bytes(data)
    (root / "synset_words.txt").write_text("".join(f"{c} {WORDS[c]}\n" for c in CLASSES))
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def official(root: Path) -> Path:
    """root/ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz."""
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    train, val = images()
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for cls in reversed(CLASSES):  # the order inside the archive is no order to rely on
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for name in reversed(list(train[cls])):
                    _add(tar, name, train[cls][name])
            _add(outer, f"{cls}.tar", inner.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for name, (_, data) in val.items():
            _add(tar, name, data)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height"]
    synsets = np.empty((len(IDS) + 1, 1), dtype=[(f, "O") for f in fields])
    for row, (ilsvrc_id, wnid) in enumerate(IDS.items()):
        synsets[row, 0] = (ilsvrc_id, wnid, WORDS[wnid], "a fish", 0, np.zeros((1, 0)), 0)
    synsets[len(IDS), 0] = (len(IDS) + 1, "n02512053", "fish", "any of various ...", 3, np.array([[1, 2, 3]]), 1)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    ids = {wnid: i for i, wnid in IDS.items()}
    truth = "".join(f"{ids[cls]}\n" for cls in VAL_CLASSES)
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())
        _add(tar, "ILSVRC2012_devkit_t12/readme.txt", b"devkit")
    return root


def kaggle(root: Path) -> Path:
    """root/ILSVRC/Data/CLS-LOC/{train/<wnid>/,val/}, LOC_val_solution.csv, LOC_synset_mapping.txt."""
    train, val = images()
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    for cls, files in train.items():
        (data / "train" / cls).mkdir(parents=True)
        for name, blob in files.items():
            (data / "train" / cls / name).write_bytes(blob)
    (data / "val").mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for name, (cls, blob) in reversed(val.items()):
        (data / "val" / name).write_bytes(blob)
        rows.append(f"{Path(name).stem},{cls} 10 12 30 28 {cls} 1 2 20 20 ")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{c} {WORDS[c]}\n" for c in CLASSES))
    return root
