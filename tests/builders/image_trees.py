"""Small ImageNet-like folder trees for the data tests, with the awkward files a real one holds.

Each awkward image is 256x256 (so the rescale to 256 is the identity and its pixels can be
compared exactly) and comes with the RGB array it must decode to.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

WHITE = 255  # alexnet2gpu.data.images.BACKGROUND: transparency is composited on white


def photo(seed: int, width: int, height: int) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: smooth colour regions, edges and mild grain."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)).astype(np.float64)
    smooth[height // 3 : height // 2, width // 4 : width // 2] = rng.integers(0, 256, 3)  # a sharp-edged block
    smooth += rng.normal(0, 3, smooth.shape)
    return np.clip(smooth, 0, 255).round().astype(np.uint8)


def gradient() -> np.ndarray:
    """(256, 256) uint8 grey levels covering 0..255."""
    return np.add.outer(np.arange(256), np.arange(256)).astype(np.uint8)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(rgb * a + WHITE * (1 - a)).astype(np.uint8)


def awkward_images(folder: Path) -> dict[str, np.ndarray]:
    """Writes one file per awkward mode into `folder`; returns name -> the (256, 256, 3) RGB it must decode to."""
    g = gradient()
    alpha = np.tile(np.linspace(0, 255, 256).round().astype(np.uint8), (256, 1))
    expected = {}

    palette = Image.frombytes("P", (256, 256), (g // 64).astype(np.uint8).tobytes())  # indices 0..3
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)]
    palette.putpalette([c for rgb in colours for c in rgb])
    palette.save(folder / "palette_transparent.png", transparency=0)  # index 0 transparent
    table = np.array([(WHITE,) * 3] + colours[1:], dtype=np.uint8)
    expected["palette_transparent.png"] = table[g // 64]

    Image.fromarray(np.stack([g, alpha], -1), "LA").save(folder / "grey_alpha.png")
    expected["grey_alpha.png"] = over_white(np.repeat(g[..., None], 3, -1), alpha)

    rgb = photo(1, 256, 256)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = over_white(rgb, alpha)

    sixteen = (np.arange(256 * 256, dtype=np.uint32).reshape(256, 256) % 65536).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "grey16.png")  # mode I;16: scaled to 8 bits, not clipped
    expected["grey16.png"] = np.repeat(np.rint(sixteen / 257).astype(np.uint8)[..., None], 3, -1)

    cmyk = np.zeros((256, 256, 4), dtype=np.uint8)
    cmyk[:128, :128], cmyk[:128, 128:], cmyk[128:] = (10, 200, 30, 40), (0, 0, 0, 0), (120, 60, 0, 100)
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.jpg", quality=95)
    c = cmyk.astype(np.float64)
    expected["cmyk.jpg"] = np.rint((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8)

    bits = g % 2 == 0
    Image.fromarray(bits).convert("1").save(folder / "one_bit.png")
    expected["one_bit.png"] = np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, -1)

    keyed = photo(2, 256, 256)
    keyed[:64] = (1, 2, 3)
    Image.fromarray(keyed).save(folder / "rgb_keyed.png", transparency=(1, 2, 3))  # tRNS: one colour transparent
    expected["rgb_keyed.png"] = keyed.copy()
    expected["rgb_keyed.png"][:64] = WHITE

    upright = photo(3, 256, 256)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation 6: stored turned 90 degrees anticlockwise, shown turned back
    Image.fromarray(np.rot90(upright, 1).copy()).save(folder / "exif_rotated.png", exif=exif)
    expected["exif_rotated.png"] = upright

    floats = g.astype(np.float32) / 255
    Image.fromarray(floats).save(folder / "float.tif")  # mode F, 0..1
    expected["float.tif"] = np.repeat(g[..., None], 3, -1)
    return expected


def unreadable_images(folder: Path) -> dict[str, str]:
    """Writes files that must be skipped; returns name -> a word their reason contains."""
    buffer = folder / "truncated.jpg"
    Image.fromarray(photo(4, 300, 260)).save(buffer, quality=90)
    buffer.write_bytes(buffer.read_bytes()[:600])
    (folder / "huge_header.png").write_bytes(png_header_only(100_000, 100_000))
    Image.fromarray(np.full((8, 8), 3.0, dtype=np.float32)).save(folder / "float_out_of_range.tif")
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)).save(folder / "float_nan.tif")
    one_nan = np.full((8, 8), 3.0, dtype=np.float32)  # NaN compares false: it hid the range check
    one_nan[2, 2] = np.nan
    Image.fromarray(one_nan).save(folder / "float_one_nan.tif")
    (folder / "text.jpg").write_text("not an image at all")
    return {
        "truncated.jpg": "truncated",
        "huge_header.png": "decompression bomb",
        "float_out_of_range.tif": "no known scale",
        "float_nan.tif": "nan or infinite",
        "float_one_nan.tif": "nan or infinite",
        "text.jpg": "not an image in any format",
    }


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels and holds none: a hostile file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def leftovers(root: Path) -> None:
    """What tools leave in a dataset tree: all of it must be ignored."""
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
        (root / split / "__MACOSX").mkdir()
        for cls in (d for d in (root / split).iterdir() if d.is_dir() and not d.name.startswith((".", "__"))):
            (cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
            (cls / "._0.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
            (cls / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
            (cls / ".ipynb_checkpoints").mkdir()


def photo_tree(root: Path, classes: tuple[str, ...] = ("ant", "bee", "cow"), per_class: int = 5) -> Path:
    """root/{train,val}/<class>/ of photo-like JPEGs and PNGs of several sizes."""
    sizes = [(300, 260), (260, 340), (256, 256), (400, 300), (180, 200)]
    for s, split in enumerate(("train", "val")):
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for j in range(per_class if split == "train" else 2):
                array = photo(100 * s + 10 * c + j, *sizes[j % len(sizes)])
                name = f"{cls}_{j}.png" if j % 3 == 2 else f"{cls}_{j}.jpg"
                Image.fromarray(array).save(folder / name, quality=92)
    return root
