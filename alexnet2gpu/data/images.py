"""One image file (or its bytes, read out of an archive) -> the paper's 256x256 RGB image (P 2),
for the live folder path and for staging.

`stage_image` opens any file PIL opens, turns every mode and bit depth into correct 8-bit RGB,
rescales the short side to 256 and keeps the centre square. A file it cannot turn into pixels
raises `UnreadableImage` with a one-line reason; the dataset decides to skip it or stop (--strict).
`is_ignored` names what tools leave in a dataset tree (hidden files, thumbnail caches), which no
listing of a class folder should see.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageCms, ImageFile, UnidentifiedImageError

from alexnet2gpu.files import open_regular

# Transparent pixels are composited on white. A transparent pixel's stored colour is arbitrary
# (often black, sometimes leftovers of an edit), so it cannot be kept; white is what a viewer or a
# web page shows behind a cut-out product photo or logo, the kind of image that carries alpha.
BACKGROUND = (255, 255, 255)

# Left by tools, never data: Finder (.DS_Store, ._name), Jupyter (.ipynb_checkpoints) and every
# other dot-name; Windows Explorer (Thumbs.db, desktop.ini), macOS zip (__MACOSX), Synology NAS
# (@eaDir), fsck (lost+found).
TOOL_LEFTOVERS = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx", "@eadir", "lost+found"})

# EXIF orientation tag -> the transpose that shows the image upright (the table of PIL's exif_transpose)
EXIF_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


class UnreadableImage(ValueError):
    """A file that does not decode to an image; the message is the one-line reason."""


def is_ignored(name: str) -> bool:
    """Files and folders that tools leave in a dataset tree: skipped by every listing, never an error."""
    return name.startswith(".") or name.lower() in TOOL_LEFTOVERS


def _image_extensions() -> tuple[str, ...]:
    """The extensions of every format PIL can decode (stubs, which identify a file but cannot
    decode it without a plugin of one's own, and MPEG video left out)."""
    Image.init()
    decodable = {
        fmt
        for fmt, (factory, _) in Image.OPEN.items()
        if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    }
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in decodable - {"MPEG"}))


IMAGE_EXTENSIONS = _image_extensions()


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def stage_image(source: str | Path | bytes | BinaryIO, size: int = 256, squash: bool = False) -> torch.Tensor:
    """An image file (a path, its bytes, or a file object such as a tar member's) as uint8
    (3, size, size): correct RGB, short side rescaled to `size`, centre square kept (P 2); with
    `squash`, the whole image resized to size x size (Caffe's). Raises UnreadableImage with the
    reason when it cannot."""
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    elif isinstance(source, str | Path):
        try:  # a FIFO or a device named like an image is refused, not read (a read could wait forever)
            with open_regular(source) as file:
                return stage_image(file, size, squash)
        except OSError as error:  # PIL's own OSErrors come back as UnreadableImage, not here
            raise UnreadableImage(error.strerror or str(error)) from None
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; a header that large is
            # hostile or broken either way, and decoding it would take gigabytes per worker
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")  # "Corrupt EXIF data": its
            # orientation is read as "upright" (`_orientation`), the pixels are fine; the warning named no file
            with Image.open(source) as image:
                square = (squash_to if squash else rescale_and_crop)(to_rgb(image), size)
                turn = EXIF_TURNS.get(_orientation(image))
        if turn is not None:  # as a viewer shows it; turns and mirrors commute with the centre crop
            square = square.transpose(turn)
    except UnreadableImage:
        raise
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError, ValueError,
        # EOFError, struct.error, IndexError, DecompressionBomb* ... on malformed files; each means "unreadable"
        if isinstance(error, UnidentifiedImageError):  # its message names the file object, not the file
            raise UnreadableImage("not an image in any format PIL decodes") from None
        reason = " ".join(str(error).split()) or "no message"
        raise UnreadableImage(f"{type(error).__name__}: {reason}") from None
    return torch.from_numpy(np.array(square)).permute(2, 0, 1)  # (3, size, size)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1: as stored); a malformed EXIF block does not make pixels unreadable."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - any parse failure means "no usable tag"
        return 1


def rescale_and_crop(image: Image.Image, size: int) -> Image.Image:
    """P 2: rescale so the short side is `size`, keep the centre `size` x `size`. Done as one resize
    of the centre square (PIL's antialiased bilinear, as torchvision's Resize), so a long thin image
    costs no more than a square one."""
    w, h = image.size
    short = min(w, h)
    if short < 1:
        raise UnreadableImage(f"the image is {w}x{h} pixels")
    left, top = (w - short) / 2, (h - short) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + short, top + short))


def squash_to(image: Image.Image, size: int) -> Image.Image:
    """Caffe: the whole image resized to `size` x `size`, the aspect ratio not kept: CF's
    convert_imageset (io.cpp ReadImageToCVMat) calls OpenCV's cv::resize with INTER_LINEAR on the
    8-bit image, and `opencv_linear` gives its output to the bit. Other resizes cost bvlc_alexnet
    2-3% top-1 (docs/CAFFE.md)."""
    w, h = image.size
    if min(w, h) < 1:
        raise UnreadableImage(f"the image is {w}x{h} pixels")
    return Image.fromarray(opencv_linear(np.asarray(image), size, size))


# OpenCV's INTER_LINEAR on 8-bit images (imgproc resize.cpp) weighs two neighbours with 11-bit integer weights
RESIZE_BITS = 11


def opencv_linear(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (height, width, C) as OpenCV 4's cv::resize INTER_LINEAR computes it
    (resize.cpp, the 8-bit path), which a float bilinear resize misses by a grey level here and there (docs/CAFFE.md).

    Each output pixel's source position is (d + 0.5) * src / dst - 0.5 in float32; its two
    neighbours get the weights 1 - f and f, rounded to 11 bits. The horizontal pass sums whole
    products (22 bits); the vertical pass drops 4 bits of each row, keeps the high 16 bits of its
    product with the row's weight, and rounds the last 2 away: the integer steps of OpenCV's SIMD
    vertical pass, which it takes for every width (checked against cv2.resize in tests/test_caffe.py).
    Columns left of the first pixel centre or right of the last copy the edge pixel, as rows do."""
    x0, x1, wx0, wx1 = _linear_taps(pixels.shape[1], width, clamp=True)
    y0, y1, wy0, wy1 = _linear_taps(pixels.shape[0], height, clamp=False)
    left, right = pixels[:, x0].astype(np.int32), pixels[:, x1].astype(np.int32)  # (H, width, C)
    rows = left * wx0[:, None] + right * wx1[:, None]  # up to 255 << 11
    top, bottom = rows[y0] >> 4, rows[y1] >> 4  # (height, width, C), fits int16 as in the SIMD lanes
    blended = ((top * wy0[:, None, None]) >> 16) + ((bottom * wy1[:, None, None]) >> 16)
    return np.clip((blended + 2) >> 2, 0, 255).astype(np.uint8)


def _linear_taps(source: int, target: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each of `target` outputs along one axis: its two source indices and their integer weights.
    `clamp` (the horizontal pass) moves an outside position onto the edge pixel with weight one;
    vertically the outside row index is clipped instead, which gives the same pixel."""
    scale = 1.0 / (target / source)  # OpenCV keeps the inverse of dst/src in double
    position = ((np.arange(target) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    fraction = position - first.astype(np.float32)  # float32, as OpenCV's
    if clamp:
        outside = (first < 0) | (first >= source - 1)
        fraction[outside] = 0
        first = np.clip(first, 0, source - 1)
    one = np.float32(1 << RESIZE_BITS)
    weight0 = np.rint((np.float32(1) - fraction) * one).astype(np.int32)  # saturate_cast<short>: round half to even
    weight1 = np.rint(fraction * one).astype(np.int32)
    return np.clip(first, 0, source - 1), np.clip(first + 1, 0, source - 1), weight0, weight1


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any mode PIL opens: transparency composited on BACKGROUND, 16-bit and float
    pixels scaled (not clipped), CMYK and YCbCr by PIL's conversions, CIELab through littlecms."""
    if image.mode in SIXTEEN_BIT or image.mode == "I":
        image = _scaled_to_8_bits(np.asarray(image), 65535, "integer")
    elif image.mode == "F":
        image = _scaled_to_8_bits(np.asarray(image), 1.0, "float")
    elif image.mode == "LAB":
        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in WITH_ALPHA or "transparency" in image.info:  # P, L and RGB can name a transparent colour
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, HSV


def _scaled_to_8_bits(values: np.ndarray, full_scale: float, kind: str) -> Image.Image:
    """Grey levels 0..full_scale -> 0..255, rounded. 16-bit files hold 0..65535; float files 0..1.
    Values outside that range have no known meaning: refused rather than guessed per image."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():  # NaN compares false: it would pass below
        raise UnreadableImage(f"{kind} pixels that are NaN or infinite: no grey level to give them")
    low, high = (values.min(), values.max()) if values.size else (0, 0)
    if low < 0 or high > full_scale:
        raise UnreadableImage(f"{kind} pixels from {low} to {high}, outside 0..{full_scale}: no known scale to 8 bits")
    scaled = np.rint(values.astype(np.float64) * (255 / full_scale)).astype(np.uint8)
    return Image.fromarray(scaled)  # mode L
