"""The data pipeline: IDX files, ImageNet folders, mean image, crops, PCA colour noise, ten-crop."""

from __future__ import annotations

import gzip
import logging
import math
import multiprocessing
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from builders.image_trees import awkward_images, leftovers, unreadable_images
from torch._subclasses.fake_tensor import FakeTensorMode

from alexnet2gpu.config import DataConfig
from alexnet2gpu.data import stats as stats_module
from alexnet2gpu.data.base import DatasetError, SkippingDataset
from alexnet2gpu.data.datasets import InMemory, batches, build_dataset, epoch_order, read_idx
from alexnet2gpu.data.images import UnreadableImage, rescale_and_crop, stage_image
from alexnet2gpu.data.stats import DataStats, fit_stats
from alexnet2gpu.data.transforms import center_crop, crop, input_pipeline, pca_noise, resize, resized_crop, ten_crop

# ---------------------------------------------------------------------------------------------
# crops


def test_ten_crop_takes_corners_centre_and_their_mirrors() -> None:
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)  # value = c*64 + row*8 + col
    crops = ten_crop(x, 5)
    assert crops.shape == (1, 10, 2, 5, 5)
    for i, (top, left) in enumerate([(0, 0), (0, 3), (3, 0), (3, 3), (1, 1)]):
        rows, cols = torch.arange(top, top + 5), torch.arange(left, left + 5)
        expected = torch.arange(2)[:, None, None] * 64 + rows[None, :, None] * 8 + cols[None, None, :]
        assert torch.equal(crops[0, i], expected.float()), i
        assert torch.equal(crops[0, i + 5], expected.flip(-1).float()), i + 5


def test_random_crops_are_windows_of_the_image_mirrored_where_asked() -> None:
    x = torch.randn(6, 3, 20, 20)
    top, left = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([5, 4, 3, 2, 1, 0])
    flip = torch.tensor([True, False, True, False, True, False])
    out = crop(x, top, left, 15, flip)
    for i in range(6):
        window = x[i, :, top[i] : top[i] + 15, left[i] : left[i] + 15]
        assert torch.equal(out[i], window.flip(-1) if flip[i] else window)


def test_resized_crop_equals_crop_of_the_resized_image() -> None:
    x = torch.randn(5, 3, 28, 28) * 50
    top, left, flip = torch.randint(33, (5,)), torch.randint(33, (5,)), torch.rand(5) < 0.5
    expected = crop(resize(x, 256), top, left, 224, flip)
    assert (resized_crop(x, 256, top, left, 224, flip) - expected).abs().max() < 1e-4 * expected.abs().max()


# ---------------------------------------------------------------------------------------------
# mean image and PCA noise


def stats_for(images: torch.Tensor) -> DataStats:
    c = images.shape[1]
    return DataStats(images.double().mean(0).float(), torch.eye(c), torch.full((c,), 0.01))


def test_fitted_mean_image_is_the_per_pixel_mean() -> None:
    images = torch.randint(0, 256, (37, 3, 9, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = InMemory(images, torch.zeros(37, dtype=torch.long), 1, "t")
    stats = fit_stats(dataset, batch_size=8)
    assert torch.allclose(stats.mean.double(), images.double().mean(0), atol=1e-4, rtol=0)
    pixels = images.double().permute(1, 0, 2, 3).reshape(3, -1) / 255
    cov = torch.cov(pixels, correction=0)
    vec, val = stats.eigvec.double(), stats.eigval.double()
    assert torch.allclose(vec @ torch.diag(val) @ vec.T, cov, atol=1e-6)
    assert stats.provenance["images"] == 37


def test_stats_fit_on_images_decoded_on_the_gpu_returns_cpu_tensors(monkeypatch) -> None:
    """With --gpu-decode, `batches` yields images already on CUDA (StagedImages.decode_batch): the
    sums live on the images' device and the statistics come back on the CPU, where they are cached.
    Imitated on fake cuda:0, where a CPU sum plus a CUDA batch is the device mismatch it was."""
    with FakeTensorMode(allow_non_fake_inputs=True):

        def on_the_gpu(dataset, batch_size, **_):
            for start in range(0, len(dataset), batch_size):
                n = min(batch_size, len(dataset) - start)
                yield torch.zeros(n, 3, 9, 9, dtype=torch.uint8, device="cuda:0"), torch.zeros(n, dtype=torch.long)

        monkeypatch.setattr(stats_module, "batches", on_the_gpu)
        stats = fit_stats(range(37), batch_size=8)
    for tensor, shape in [(stats.mean, (3, 9, 9)), (stats.eigvec, (3, 3)), (stats.eigval, (3,))]:
        assert tensor.device == torch.device("cpu") and tensor.dtype == torch.float32 and tensor.shape == shape
    assert stats.provenance["images"] == 37


def test_mean_subtraction_is_exact() -> None:
    images = torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8)
    mean = torch.rand(3, 256, 256) * 255
    own = DataConfig(dataset="fake", mean_crop="own")  # P 2's each pixel's own mean (K12's centre mean: below)
    pipe = input_pipeline(own, DataStats(mean, torch.eye(3), torch.ones(3)), "cpu", train=False)
    assert torch.equal(pipe.normalise(images), images.float() - mean)
    assert torch.equal(pipe(images), center_crop(images.float() - mean, 224))


def test_pca_noise_lies_in_the_eigenvector_span_with_alpha_lambda_spread() -> None:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3)))
    eigval = torch.tensor([0.2, 0.05, 0.0])  # a rank-2 covariance: the noise must miss q[:, 2]
    stats = DataStats(torch.zeros(3, 1, 1), q, eigval)
    n = 40_000
    noise = pca_noise(n, stats, 0.1, "eigenvalue", 255.0, torch.Generator().manual_seed(0)).double()
    coefficients = noise @ q.double() / 255  # (N, 3): alpha_i * lambda_i
    assert coefficients[:, 2].abs().max() < 1e-6
    # the std of N normal samples has relative standard error 1/sqrt(2N) = 0.35%: 2% is over 5 sigma
    assert coefficients[:, 0].std().item() == pytest.approx(0.1 * 0.2, rel=0.02)
    assert coefficients[:, 1].std().item() == pytest.approx(0.1 * 0.05, rel=0.02)
    stdev = pca_noise(n, stats, 0.1, "stdev", 255.0, torch.Generator().manual_seed(0)).double() @ q.double()
    assert (stdev[:, 0] / 255).std().item() == pytest.approx(0.1 * 0.2**0.5, rel=0.02)


def test_train_pipeline_adds_one_colour_shift_per_image() -> None:
    images = torch.randint(0, 256, (8, 3, 256, 256), dtype=torch.uint8)
    stats = DataStats(
        torch.full((3, 256, 256), 100.0), torch.linalg.qr(torch.randn(3, 3))[0], torch.tensor([0.2, 0.02, 0.004])
    )
    config = DataConfig(dataset="fake", pca_rescale=False)  # the shift alone (K12's division after it: below)
    with_noise = input_pipeline(config, stats, "cpu", train=True)
    without = input_pipeline(DataConfig(dataset="fake", pca_noise=False), stats, "cpu", train=True)
    a = with_noise(images, torch.Generator().manual_seed(5))
    b = without(images, torch.Generator().manual_seed(5))
    shift = a - b  # (N, 3, 224, 224): the same crop and flip, plus the noise
    assert shift.shape == (8, 3, 224, 224)
    per_image = shift[:, :, :1, :1]
    assert torch.allclose(shift, per_image.expand_as(shift), atol=1e-3)
    assert per_image.flatten(1).std(0).min() > 0.01  # a different shift for each image


def small_k12(**fields) -> tuple[DataConfig, DataStats, torch.Tensor]:
    """40x40 images cropped to 32 (9 offsets each way), a mean image of random values, no noise or flips
    unless asked, every image its own crop and no division: small enough to find every crop's offset by
    trying them all."""
    fields = {"pca_noise": False, "flip": False, "crop_chunk": 1, "pca_rescale": False, **fields}
    config = DataConfig(dataset="fake", stage_size=40, crop_size=32, **fields)
    g = torch.Generator().manual_seed(4)
    stats = DataStats(torch.rand(3, 40, 40, generator=g) * 255, torch.eye(3), torch.tensor([0.2, 0.02, 0.004]))
    return config, stats, torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8, generator=g)


def window(image: torch.Tensor, top: int, left: int, flipped: bool) -> torch.Tensor:
    patch = image[:, top : top + 32, left : left + 32]
    return patch.flip(-1) if flipped else patch


def where_cropped(out: torch.Tensor, images: torch.Tensor, mean: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Each output's (top, left, flipped), found as the window of its image that, minus `mean`, it is."""
    found = []
    for x, image in zip(out, images.float(), strict=True):
        hits = [
            (top, left, flipped)
            for top in range(9)
            for left in range(9)
            for flipped in (False, True)
            if torch.allclose(x, window(image, top, left, flipped) - mean, atol=1e-4)
        ]
        assert len(hits) == 1, hits
        found += hits
    return found


def test_k12_mean_is_the_centre_of_the_mean_image_off_every_crop_and_view() -> None:
    """K12 (convdata_jpeg.py data_mean_crop): whatever a crop's offset, it loses the mean image's centre."""
    config, stats, images = small_k12(mean_crop="centre")
    centre = stats.mean[:, 4:36, 4:36]
    train = input_pipeline(config, stats, "cpu", train=True)
    offsets = where_cropped(train(images, torch.Generator().manual_seed(1)), images, centre)
    assert len({(top, left) for top, left, _ in offsets}) > 1  # crops away from the centre lose it too
    test = input_pipeline(config, stats, "cpu", train=False)
    assert torch.allclose(test(images), center_crop(images.float(), 32) - centre, atol=1e-4)
    views = test.ten_crops(images)  # (N, 10, C, 32, 32): the mirrored views lose the unmirrored centre
    assert torch.allclose(views[:, 9], center_crop(images.float(), 32).flip(-1) - centre, atol=1e-4)
    own = input_pipeline(DataConfig(**{**config.to_dict(), "mean_crop": "own"}), stats, "cpu", train=False)
    assert torch.allclose(own.ten_crops(images)[:, 0], (images.float() - stats.mean)[..., :32, :32], atol=1e-4)


def test_k12_crop_chunks_share_one_offset_and_flip_and_split_over_processes_alike() -> None:
    """K12 (convdata_jpeg.py crop_chunk = 32): one offset and one flip for each run of chunk images."""
    config, stats, images = small_k12(mean_crop="centre", crop_chunk=4, flip=True)
    pipe = input_pipeline(config, stats, "cpu", train=True)
    out = pipe(images, torch.Generator().manual_seed(2))
    found = where_cropped(out, images, stats.mean[:, 4:36, 4:36])
    assert len(set(found[:4])) == 1 and len(set(found[4:])) == 1 and found[0] != found[4]
    part = pipe(images[4:], torch.Generator().manual_seed(2), rows=(4, 8))  # the second process's rows
    assert torch.equal(part, out[4:])


def test_k12_pca_rescale_divides_the_noised_crop_by_one_point_one() -> None:
    config, stats, images = small_k12(pca_scale="stdev")
    noised = DataConfig(**{**config.to_dict(), "pca_noise": True})
    shrunk = DataConfig(**{**noised.to_dict(), "pca_rescale": True})
    a = input_pipeline(noised, stats, "cpu", train=True)(images, torch.Generator().manual_seed(3))
    b = input_pipeline(shrunk, stats, "cpu", train=True)(images, torch.Generator().manual_seed(3))
    assert torch.allclose(b * 1.1, a, atol=1e-4) and not torch.allclose(a, b, atol=1e-2)


def test_seed_preset_is_resize_and_normalise() -> None:
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = input_pipeline(DataConfig(dataset="mnist", preset="seed"), None, "cpu", train=True)(images)
    expected = (resize(images.float() / 255, 224) - 0.1307) / 0.3081
    assert out.shape == (2, 1, 224, 224) and torch.allclose(out, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# IDX files


def write_idx(path: Path, array: torch.Tensor, zipped: bool, magic: bytes | None = None) -> Path:
    header = magic or bytes([0, 0, 8, array.dim()])
    raw = header + struct.pack(f">{array.dim()}I", *array.shape) + array.numpy().tobytes()
    path.write_bytes(gzip.compress(raw) if zipped else raw)
    return path


@pytest.mark.parametrize("zipped", [False, True])
def test_idx_reader_reads_back_what_was_written(tmp_path: Path, zipped: bool) -> None:
    images = torch.randint(0, 256, (5, 4, 3), dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / "x", images, zipped)), images)
    labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / "y", labels, zipped)), labels)


def test_idx_reader_rejects_wrong_magic_and_truncation(tmp_path: Path) -> None:
    images = torch.zeros(2, 2, 2, dtype=torch.uint8)
    with pytest.raises(DatasetError, match="magic number 00000d03"):
        read_idx(write_idx(tmp_path / "float", images, False, magic=bytes([0, 0, 0x0D, 3])))
    path = write_idx(tmp_path / "short", images, False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(path)
    with pytest.raises(DatasetError, match="images of 0x0 pixels, which hold nothing"):
        read_idx(write_idx(tmp_path / "empty", torch.zeros(5, 0, 0, dtype=torch.uint8), False))
    assert read_idx(write_idx(tmp_path / "none", torch.zeros(0, 28, 28, dtype=torch.uint8), False)).shape == (0, 28, 28)


def test_idx_dataset_from_a_folder_and_label_range(tmp_path: Path) -> None:
    for prefix, n in (("train", 12), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", torch.zeros(n, 28, 28, dtype=torch.uint8), True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", torch.arange(n, dtype=torch.uint8) % 10, False)
    train = build_dataset("mnist", "train", str(tmp_path))
    assert train.images.shape == (12, 1, 28, 28) and train.labels.tolist()[:3] == [0, 1, 2]
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.tensor([0, 1, 2, 10], dtype=torch.uint8), False)
    with pytest.raises(DatasetError, match="outside 0..9"):
        build_dataset("mnist", "val", str(tmp_path))


def test_idx_files_of_the_wrong_form_are_one_line(tmp_path: Path) -> None:
    """From a hostile pass: a deflate stream damaged inside a whole gzip (zlib.error), labels of two
    dimensions (the loss's traceback; evaluate printed an error rate), images that are not square, and a
    FIFO named like an IDX file (reported missing, as if absent)."""
    for prefix, n in (("train", 12), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", torch.zeros(n, 28, 28, dtype=torch.uint8), False)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", torch.arange(n, dtype=torch.uint8) % 10, False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(labels, torch.zeros(12, 2, dtype=torch.uint8), False)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte: expected one label per image \(N,\)"):
        build_dataset("mnist", "train", str(tmp_path))
    write_idx(labels, torch.zeros(12, dtype=torch.uint8), False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", torch.zeros(4, 300, 2, dtype=torch.uint8), False)
    with pytest.raises(DatasetError, match=r"expected square images \(N, H, H\), got shape \(4, 300, 2\)"):
        build_dataset("mnist", "val", str(tmp_path))
    packed = gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 12, 28, 28) + bytes(range(256)) * 37)
    damaged = bytearray(packed)
    damaged[120:123] = b"\xff\xff\xff"  # inside the deflate data: zlib, not gzip's CRC, sees it first
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(damaged))
    with pytest.raises(DatasetError, match="corrupt gzip data"):
        read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    os.mkfifo(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte: .*FIFO"):
        build_dataset("mnist", "train", str(tmp_path))


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DatasetError, match=rf"mnist not found: looked in {tmp_path}.*--data FOLDER"):
        build_dataset("mnist", "train", str(tmp_path))


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist (.ci/run installs it)")
def test_fashion_mnist_from_the_debian_package() -> None:
    train, test = build_dataset("fashion-mnist", "train"), build_dataset("fashion-mnist", "val")
    assert train.images.shape == (60_000, 1, 28, 28) and len(test) == 10_000
    assert train.labels.bincount().tolist() == [6_000] * 10
    assert test.labels.bincount().tolist() == [1_000] * 10


# ---------------------------------------------------------------------------------------------
# ImageNet folders


def make_imagenet(root: Path, classes=("cat", "dog"), per_class: int = 2) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for i, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for j in range(per_class):
                array = torch.full((30 + 10 * j, 40, 3), 60 * i + j, dtype=torch.uint8).numpy()
                Image.fromarray(array).save(folder / f"{j}.jpg" if j % 2 == 0 else folder / f"{j}.png")
    return root


def test_imagenet_folder_is_staged_to_256(tmp_path: Path) -> None:
    train = build_dataset("imagenet", "train", str(make_imagenet(tmp_path)))
    assert len(train) == 4 and train.classes == ["cat", "dog"]
    image, label = train[3]
    assert image.shape == (3, 256, 256) and image.dtype == torch.uint8 and label == 1
    (images, labels), *_ = list(batches(train, 4, shuffle=False))
    assert images.shape == (4, 3, 256, 256) and labels.tolist() == [0, 0, 1, 1]


def test_unreadable_image_is_reported_and_skipped(tmp_path: Path, caplog) -> None:
    root = make_imagenet(tmp_path)
    broken = root / "train" / "dog" / "0.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    train = build_dataset("imagenet", "train", str(root))
    with caplog.at_level(logging.WARNING):
        got = [labels for _, labels in batches(train, 4, shuffle=False)]
    assert torch.cat(got).tolist() == [0, 0, 1]
    assert str(broken) in caplog.text and "1 skipped so far" in caplog.text
    strict = build_dataset("imagenet", "train", str(root), strict=True)
    with pytest.raises(DatasetError, match="unreadable image .*0.jpg"):
        strict[2]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "train" / "cat" / "notes.txt").write_text("x"), "notes.txt is not an image"),
        (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], "dog is empty"),
        (lambda r: (r / "val" / "bird").mkdir(), "classes that train/ lacks"),
        (lambda r: [p.unlink() for p in (r / "val" / "dog").iterdir()] and (r / "val" / "dog").rmdir(), "dog.*missing"),
    ],
)
def test_malformed_imagenet_folders_are_named(tmp_path: Path, damage, message: str) -> None:
    root = make_imagenet(tmp_path)
    damage(root)
    with pytest.raises(DatasetError, match=message):
        build_dataset("imagenet", "train", str(root))
        build_dataset("imagenet", "val", str(root))


def test_imagenet_without_folders_says_what_layout_it_needs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="lacks train/.*ImageFolder layout"):
        build_dataset("imagenet", "train", str(tmp_path))
    with pytest.raises(DatasetError, match="needs --data"):
        build_dataset("imagenet", "train", None)


# ---------------------------------------------------------------------------------------------
# every image a class folder may hold


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> tuple[Path, dict, dict]:
    folder = tmp_path_factory.mktemp("awkward")
    return folder, awkward_images(folder), unreadable_images(folder)


def test_every_mode_decodes_to_its_pixels(awkward) -> None:
    folder, expected, _ = awkward
    for name, pixels in expected.items():  # transparency on white, 16-bit and float scaled, CMYK, 1-bit, EXIF
        got = stage_image(folder / name).permute(1, 2, 0).numpy()
        assert got.shape == (256, 256, 3) and got.dtype == np.uint8, name
        assert np.array_equal(got, pixels), f"{name}: max error {np.abs(got.astype(int) - pixels).max()}"


def test_unreadable_and_hostile_files_raise_their_reason(awkward) -> None:
    folder, _, unreadable = awkward
    for name, word in unreadable.items():
        with pytest.raises(UnreadableImage, match=f"(?i){word}"):
            stage_image(folder / name)


def test_rescale_keeps_the_centre_square() -> None:
    from PIL import Image

    wide = np.zeros((256, 512, 3), dtype=np.uint8)
    wide[:, :128], wide[:, 128:384], wide[:, 384:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    square = np.asarray(rescale_and_crop(Image.fromarray(wide), 256))
    assert np.array_equal(square, wide[:, 128:384])  # the short side is 256 already: only the crop
    tall = np.zeros((90, 30, 3), dtype=np.uint8)
    tall[30:60] = 200  # the centre 30x30 square, upscaled to 256
    upscaled = np.asarray(rescale_and_crop(Image.fromarray(tall), 256))
    assert upscaled[4:-4].min() == 200  # the outer rows blend with the rows above and below, as a resize does
    assert upscaled[0].max() < 200 and upscaled[-1].max() < 200
    thin = Image.new("RGB", (1, 100_000), (7, 8, 9))  # 25.6 Mpx if resized whole: only the square is
    assert np.asarray(rescale_and_crop(thin, 256)).reshape(-1, 3).tolist()[0] == [7, 8, 9]


def test_awkward_tree_skips_with_path_and_reason_or_stops_with_strict(tmp_path: Path, caplog) -> None:
    root = make_imagenet(tmp_path)
    expected = awkward_images(root / "train" / "cat")
    unreadable = unreadable_images(root / "train" / "dog")
    leftovers(root)
    train = build_dataset("imagenet", "train", str(root))
    names = [path.name for path, _ in train.samples]
    assert sorted(names) == sorted(["0.jpg", "1.png"] * 2 + list(expected) + list(unreadable))
    with caplog.at_level(logging.WARNING):
        got = torch.cat([labels for _, labels in batches(train, 8, shuffle=False)])
    assert got.tolist() == [0] * (2 + len(expected)) + [1] * 2
    for name, word in unreadable.items():
        line = next(r.getMessage() for r in caplog.records if name in r.getMessage())
        assert str(root / "train" / "dog" / name) in line and word in line.lower()
    strict = build_dataset("imagenet", "train", str(root), strict=True)
    first_bad = next(i for i, (path, _) in enumerate(strict.samples) if path.name in unreadable)
    with pytest.raises(DatasetError, match="unreadable image .*drop --strict"):
        strict[first_bad]


def test_odd_names_and_words_are_printed_escaped_and_a_corrupt_exif_is_no_warning(tmp_path: Path, caplog) -> None:
    """A name holding a newline or a terminal escape is escaped in the skip warning and the --strict error
    (it forged a line, or cleared the screen); a U+2028 inside a class's words is no line break; a JPEG
    with a corrupt EXIF block decodes without PIL's warning (which named no file)."""
    import io
    import warnings

    from PIL import Image

    root = make_imagenet(tmp_path)
    (root / "train" / "dog" / "bad\nname\x1b[2J.jpg").write_bytes(b"not an image")
    (root / "synset_words.txt").write_text("cat felis\u2028catus\ndog canis\n")
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(
        buffer, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(50)
    )
    (root / "train" / "cat" / "exif.jpg").write_bytes(buffer.getvalue())
    train = build_dataset("imagenet", "train", str(root))
    assert train.categories.names == ("felis\u2028catus", "canis")
    bad = next(i for i, (path, _) in enumerate(train.samples) if "bad" in path.name)
    exif = next(i for i, (path, _) in enumerate(train.samples) if path.name == "exif.jpg")
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert train[bad] is None  # skipped, with its warning
        assert train[exif][0].shape == (3, 256, 256)
    [line] = [r.getMessage() for r in caplog.records if "bad" in r.getMessage()]
    assert "bad\\nname\\x1b[2J.jpg" in line and "\n" not in line and "\x1b" not in line
    with pytest.raises(DatasetError) as refused:
        build_dataset("imagenet", "train", str(root), strict=True)[bad]
    assert "bad\\nname\\x1b[2J.jpg" in str(refused.value) and "\x1b" not in str(refused.value)


def test_tool_leftovers_are_ignored_everywhere(tmp_path: Path) -> None:
    from alexnet2gpu.data.datasets import describe

    root = make_imagenet(tmp_path)
    leftovers(root)  # .DS_Store, ._x.jpg, Thumbs.db, .ipynb_checkpoints/ and __MACOSX/ in train/ and val/
    for split in ("train", "val"):
        dataset = build_dataset("imagenet", split, str(root))
        assert dataset.classes == ["cat", "dog"] and len(dataset) == 4
    assert describe("imagenet", str(root)) == (2, 3)


def test_a_folder_inside_a_class_folder_is_named(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path)
    (root / "train" / "cat" / "more").mkdir()
    with pytest.raises(DatasetError, match="cat/more is a folder inside a class folder"):
        build_dataset("imagenet", "train", str(root))


def test_strict_error_from_a_worker_is_one_line(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path)
    (root / "train" / "dog" / "0.jpg").write_bytes(b"\xff\xd8 broken")
    strict = build_dataset("imagenet", "train", str(root), strict=True)
    with pytest.raises(DatasetError) as caught:
        list(batches(strict, 2, shuffle=False, workers=1))
    assert "\n" not in str(caught.value) and str(caught.value).startswith("unreadable image ")


class Encoded(SkippingDataset):
    """StagedImages under --gpu-decode, imitated on the CPU: the workers hand over each image's bytes
    (its row first), and `decode_batch` decodes a whole batch in the main process."""

    def __init__(self, n: int, bad: int | None = None) -> None:
        super().__init__(strict=True)
        self.images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        self.decode_device, self.bad, self.threads = torch.device("cpu"), bad, set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.cat([torch.tensor([i], dtype=torch.uint8), self.images[i].flatten()]), i % 5

    def decode_batch(self, encoded: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.threads.add(threading.current_thread().name)
        if self.bad in [int(e[0]) for e in encoded]:
            raise DatasetError(f"unreadable image row {self.bad}: no JPEG header (drop --strict to skip such images)")
        return torch.stack([e[1:].view(3, 4, 4) for e in encoded]), labels


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_decoded_in_the_background_are_the_epochs_batches_in_order(workers: int) -> None:
    dataset = Encoded(70)
    order = epoch_order(70, seed=1, epoch=2, shuffle=True)
    expected = [(dataset.images[rows], torch.tensor([int(i) % 5 for i in rows])) for rows in order.split(8)]
    got = list(batches(dataset, 8, shuffle=True, seed=1, epoch=2, workers=workers))
    assert len(got) == len(expected) == 9
    assert all(torch.equal(x, ex) and torch.equal(y, ey) for (x, y), (ex, ey) in zip(got, expected, strict=True))
    resumed = list(batches(dataset, 8, shuffle=True, seed=1, epoch=2, start=5, workers=workers))
    assert all(torch.equal(x, ex) for (x, _), (ex, _) in zip(resumed, expected[5:], strict=True))
    assert len(resumed) == 4
    assert dataset.threads and all(name.startswith("prefetch") for name in dataset.threads)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_background_decode_error_and_an_early_stop_leave_no_thread(workers: int) -> None:
    seen = []
    with pytest.raises(DatasetError) as caught:
        for _, labels in batches(Encoded(64, bad=21), 4, shuffle=False, workers=workers):
            seen.append(len(labels))
    assert str(caught.value) == "unreadable image row 21: no JPEG header (drop --strict to skip such images)"
    assert seen == [4] * 5  # the batches before row 21's
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch")]
    before = set(multiprocessing.active_children())  # the failed loader's, kept alive by `caught`'s traceback
    for _ in batches(Encoded(64), 4, shuffle=False, workers=workers):
        break  # a consumer that stops at once, with DataLoader workers still loading ahead
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch")]
    assert not set(multiprocessing.active_children()) - before  # and the loader's workers ended with it


def test_resume_stays_exact_when_a_whole_batch_is_skipped(tmp_path: Path) -> None:
    from alexnet2gpu.config import AlexNetConfig, TrainConfig
    from alexnet2gpu.train import checkpoint as ckpt
    from alexnet2gpu.train.loop import train

    root = make_imagenet(tmp_path / "data", per_class=5)
    train_set = build_dataset("imagenet", "train", str(root))
    order = epoch_order(len(train_set), 3, 0, shuffle=True)
    for i in order[2:4].tolist():  # batch 1 of the first epoch: both its images unreadable
        train_set.samples[i][0].write_bytes(b"broken")
    small = AlexNetConfig(num_classes=2, conv_channels=(8, 16, 16, 16, 16), fc_features=(16, 16), init="he")
    data = DataConfig(dataset="imagenet", data=str(root), workers=0, fit_images=4)
    cpu = (torch.device("cpu"),) * 2

    def run(out: Path, steps: int, resume: Path | None = None) -> dict:
        config = TrainConfig(epochs=1, batch_size=2, max_steps=steps, val_subset=2, seed=3)
        return train(small, data, config, cpu, out, resume=resume, progress=False, tensorboard=False)

    run(tmp_path / "straight", 3)  # batches 0, 2, 3 make the three steps
    run(tmp_path / "split", 2)  # batches 0, 2: batch 1 counted although it made no step
    assert ckpt.load(tmp_path / "split" / "last.pt")["batch"] == 3
    run(tmp_path / "split", 3, resume=tmp_path / "split" / "last.pt")
    a, b = (ckpt.load(tmp_path / run_ / "last.pt")["model"] for run_ in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# order


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    assert torch.equal(epoch_order(100, 1, 2, True), epoch_order(100, 1, 2, True))
    assert not torch.equal(epoch_order(100, 1, 2, True), epoch_order(100, 1, 3, True))
    dataset = build_dataset("fake", "val")
    full = [labels for _, labels in batches(dataset, 32, shuffle=True, seed=4, epoch=1)]
    resumed = [labels for _, labels in batches(dataset, 32, shuffle=True, seed=4, epoch=1, start=3)]
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed, strict=True))


def test_stats_cache_is_per_training_set_and_refits_a_broken_file(tmp_path: Path) -> None:
    from alexnet2gpu.data.stats import cache_path, fingerprint, load_or_fit

    full = build_dataset("fake", "train")
    small = InMemory(full.images[:64], full.labels[:64], 10, "fake")
    a = load_or_fit(full, name="fake", data=None, stage_size=256, limit=None, cache_dir=tmp_path)
    b = load_or_fit(small, name="fake", data=None, stage_size=256, limit=None, cache_dir=tmp_path)
    assert a.provenance["images"] == 1024 and b.provenance["images"] == 64  # a subset is not the full set
    assert {"dataset", "stage_size", "date"} <= a.provenance.keys()
    path = cache_path(tmp_path, "fake", None, 256, None, fingerprint(small))
    path.write_bytes(b"not a tensor file")
    again = load_or_fit(small, name="fake", data=None, stage_size=256, limit=None, cache_dir=tmp_path)
    assert torch.equal(again.mean, b.mean)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.update(eigval=torch.tensor([math.nan, -5.0, 1e30])),  # fit-stats printed NaN, exit 0
        lambda d: d.update(eigvec=torch.eye(2)),  # train: a matmul traceback
        lambda d: d["mean"].__setitem__((0, 3, 3), math.nan),  # train wrote a checkpoint predict refused
        lambda d: d.update(mean=d["mean"][:, :5]),
        lambda d: d.update(eigval=torch.tensor([1.0, -0.5, 0.1])),
        lambda d: d.pop("eigvec"),
        lambda d: d["eigval"].__setitem__(0, 1e30),  # finite, and no variance of [0, 1] pixels
        lambda d: d.update(eigvec=torch.ones(3, 3)),  # not orthonormal
        lambda d: d.update(mean=d["mean"] * 1e6),  # no mean of 8-bit pixels
    ],
)
def test_a_damaged_stats_cache_is_fitted_again(tmp_path: Path, damage, capsys) -> None:
    """The statistics cache is checked (shapes, finiteness, eigenvalues of 0 or more), not trusted."""
    from alexnet2gpu.data.stats import cache_path, fingerprint, load_or_fit

    full = build_dataset("fake", "train")
    small = InMemory(full.images[:32], full.labels[:32], 10, "fake")
    fitted = load_or_fit(small, name="fake", data=None, stage_size=256, limit=None, cache_dir=tmp_path)
    path = cache_path(tmp_path, "fake", None, 256, None, fingerprint(small))
    saved = torch.load(path, weights_only=True)
    damage(saved)
    torch.save(saved, path)
    again = load_or_fit(small, name="fake", data=None, stage_size=256, limit=None, cache_dir=tmp_path)
    assert torch.equal(again.mean, fitted.mean) and torch.equal(again.eigvec, fitted.eigvec)
    assert "does not hold usable statistics: fitting them again" in capsys.readouterr().err
    assert DataStats.problem(torch.load(path, weights_only=True)) is None  # the cache holds the refit


def test_describe_gives_classes_and_channels_without_reading_images(tmp_path: Path) -> None:
    from alexnet2gpu.data.datasets import describe

    assert describe("imagenet", str(make_imagenet(tmp_path, classes=("a", "b", "c")))) == (3, 3)
    assert describe("fake", None) == (10, 3)
    with pytest.raises(DatasetError, match="lacks train/"):
        describe("imagenet", str(tmp_path / "nowhere"))
