"""The model's configuration: the paper's network as its 2012 code trained it (run 145) by default,
every listed deviation a field.

K12 = the 2012 code (computerhistory/AlexNet-Source-Code: layers/layers-145.cfg, layer-params-145.cfg,
convdata_jpeg.py); P = Krizhevsky, Sutskever, Hinton, NIPS 2012; C2 = cuda-convnet2's two-GPU layer
file; CF = Caffe's bvlc_alexnet.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

ACTIVATIONS = ("relu", "tanh")
POOLINGS = {"overlapping": (3, 2), "non-overlapping": (2, 2)}  # P 3.4: z=3, s=2 against z=s=2
INPUT_SIZES = (224, 227)
CONV1_PADDINGS = ("c2", "none")
INITS = ("paper", "k12", "caffe", "he", "torch")
LRN_SCOPES = ("tower", "all")
LRN1_INPUTS = ("linear", "relu")
DROPOUT_SCALES = ("test", "train")


class ConfigError(ValueError):
    """A config field cannot take a value; `owner`, `field` and `value` say which (the CLI names its flag)."""

    def __init__(self, owner: str, field: str, value, expected: str) -> None:
        super().__init__(f"{owner}.{field}={value!r}: expected {expected}")
        self.owner, self.field, self.value, self.expected = owner, field, value, expected


def check_fields(config, checks: list[tuple[str, bool, str]]) -> None:
    """Raise a ConfigError for the first (field, ok, expected) that is not ok: the one way every config
    checks its fields."""
    for field, ok, expected in checks:
        if not ok:
            raise ConfigError(type(config).__name__, field, getattr(config, field), expected)


class Fields:
    """to_dict and from_dict, shared by the configs: what a checkpoint stores and reads back.

    `LEGACY` holds, for each field added after checkpoints were first written, the value the code
    before it behaved as: a field missing from a saved config means that, not today's default, so an
    old checkpoint rebuilds the network it was trained as."""

    LEGACY: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        """The config from its saved fields; unknown ones (another version's) are refused by name, and
        lists (JSON's, torch.save's of a tuple) become tuples again."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} fields {unknown} (written by another version?); known: {sorted(known)}"
            )
        values = {**{k: v for k, v in cls.LEGACY.items() if k not in values}, **values}
        values = {key: tuple(v) if isinstance(v, list) else v for key, v in values.items()}
        for field in dataclasses.fields(cls):
            if field.name in values and not _of_type(values[field.name], str(field.type)):
                raise ValueError(f"{cls.__name__}.{field.name}={values[field.name]!r}: expected {field.type}")
        return cls(**values)


def _of_type(value, annotation: str) -> bool:
    """Whether a saved value has its field's type: the annotations here are int, float, bool, str, None
    and tuples of ints, joined by |. A bool is not an int here, an int is a float."""
    for kind in (part.strip() for part in annotation.split("|")):
        if kind == "None" and value is None:
            return True
        if kind == "bool" and isinstance(value, bool):
            return True
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind == "str" and isinstance(value, str):
            return True
        if kind.startswith("tuple[") and isinstance(value, tuple) and all(_of_type(v, "int") for v in value):
            return True
    return False


def finite(x) -> bool:
    """A real number that is not NaN or infinite (argparse's float() takes "nan" and "inf")."""
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class AlexNetConfig(Fields):
    """What the network is. The defaults are the paper's 1000-class, two-tower ImageNet model as K12's
    layers-145 builds it.

    Channel and feature counts are for the whole network; each tower holds `1 / towers` of every
    layer except where `towers == 1`.
    """

    # added with the K12 fields (2026-12): a checkpoint without them was conv1 -> ReLU -> LRN1 -> pool1,
    # no spatial norm, inverted dropout
    LEGACY: ClassVar[dict] = dict(lrn1_input="relu", spatial_norm=False, dropout_scale="train")

    num_classes: int = 1000
    in_channels: int = 3  # 1 for the seed's MNIST run
    # P says 224, but 11x11 stride 4 needs 227 for 55x55. C2 reads zeros past the right/bottom
    # edge of a 224 crop (padding 3 on those sides only); 227 takes the crop as it is.
    input_size: int = 224
    # "c2": a 224 input gets C2's zeros up to 227 (55x55 after conv1, 6x6 after pool5). "none": conv1
    # reads the input as it is, so 224 gives 54, 26, 12 and 5x5 after pool5 (the seed's network).
    conv1_padding: str = "c2"
    towers: int = 2  # 1 gives a single-tower net (the paper's one-GPU comparison, the seed's model)
    conv_channels: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256)  # P 3.5
    fc_features: tuple[int, int] = (4096, 4096)  # fc6, fc7
    # Not in P: a hidden layer `fc_hidden` of this width between fc7 and fc8 (ReLU, no dropout). The
    # seed keeps a 1000-unit layer (ImageNet's fc8 width) before its 10 logits. One tower only.
    fc_hidden: int | None = None
    # False: one 1000-way fc8 on tower A (K12 layers-145.cfg: fc1000 on GPU 0, reading both towers' fc7;
    # C2 alike). True: 500 logits per tower (P's Figure 2).
    fc8_split: bool = False
    # P 3.3 as Krizhevsky's code computes it: PyTorch's LocalResponseNorm divides alpha by size
    lrn: bool = True
    lrn_size: int = 5
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    lrn_k: float = 2.0
    # "tower": each tower normalises its own maps (P 3.3 with P 3.2's split; cuda-convnet). "all": the
    # window runs over all 96 (256) channels, across the towers at channels 46-49 (126-129), as Caffe's
    # bvlc_alexnet (the only published weights of this network): in the towers a halo of the other
    # tower's size//2 edge channels at LRN1 and LRN2, an exchange the paper does not have.
    lrn_scope: str = "tower"
    # What LRN1 normalises. "linear": conv1's output before its ReLU, then pool1, then the ReLU (K12
    # layers-145.cfg: rnorm1 reads conv1, pool1 carries the relu; the squares include the negative
    # pre-activations). "relu": conv1 -> ReLU -> LRN1 -> pool1 (P 3.3, 3.5's text; C2, CF).
    lrn1_input: str = "linear"
    # K12's normalisation within each map after LRN2, before pool2 (layers-145.cfg `cnorm2`, type rnorm,
    # layer-params-145.cfg scale 0.001 pow 0.75): a / (1 + alpha/size^2 * sum of a^2 over the size x size
    # window)^beta. Not in P's text, C2 or CF.
    spatial_norm: bool = True
    spatial_norm_size: int = 5
    spatial_norm_alpha: float = 1e-3
    spatial_norm_beta: float = 0.75
    pooling: str = "overlapping"
    activation: str = "relu"  # "tanh" for the paper's Figure 1 comparison
    dropout: float = 0.5  # P 4.2: on the outputs of fc6 and fc7
    # Where dropout's factor goes. "test": a 0/1 mask in training, the outputs times (1 - dropout) at
    # test (P 4.2's "multiply their outputs by 0.5"; K12 src/layer.cu, the `hs` layers). "train":
    # PyTorch's inverted dropout, survivors times 1 / (1 - dropout) in training, nothing at test (C2, CF).
    dropout_scale: str = "test"
    # "k12": the 2012 code's (K12 layers-145.cfg initW, initB): N(0, 0.03) for conv3-conv5, N(0, 0.01)
    # elsewhere, biases 1 for conv2, conv4, conv5, fc6, fc7 and 0 for the others.
    # "paper": N(0, 0.01) for all, biases as K12's (P 5's text; alone, it diverges on Fashion-MNIST and
    # sits at chance: experiments/RESULTS.md, "Initialisation").
    # "caffe": CF bvlc_alexnet's published fix (its readme: biases of 1 "gave flat loss"): N(0, 0.01),
    # fc6/fc7 N(0, 0.005), biases 0.1 where P has 1 (the default before K12's).
    # "he": He et al. 2015 normal init, biases 0 (the seed preset's inputs of unit scale).
    # "torch": PyTorch's default, each layer's reset_parameters (the seed's network, which sets none).
    init: str = "k12"

    def __post_init__(self) -> None:
        basics = [
            ("num_classes", self.num_classes >= 1, "a positive number of classes"),
            ("in_channels", self.in_channels >= 1, "a positive number of input channels (3 for RGB, 1 for grayscale)"),
            ("input_size", self.input_size in INPUT_SIZES, "224 (zeros right and bottom, as cuda-convnet) or 227"),
            (
                "conv1_padding",
                self.conv1_padding in CONV1_PADDINGS,
                "c2 (zeros up to 227, as cuda-convnet) or none (the seed's 54x54 conv1)",
            ),
            ("towers", self.towers in (1, 2), "2 (the paper's network) or 1 (one tower)"),
        ]
        check_fields(self, basics)  # towers first: the checks below divide by it
        checks = [
            (
                "conv_channels",
                len(self.conv_channels) == 5 and not any(c % self.towers for c in self.conv_channels),
                f"five channel counts, each divisible by towers={self.towers}",
            ),
            (
                "fc_features",
                len(self.fc_features) == 2 and not any(f % self.towers for f in self.fc_features),
                f"two feature counts (fc6, fc7), each divisible by towers={self.towers}",
            ),
            (
                "fc_hidden",
                self.fc_hidden is None or (self.fc_hidden >= 1 and self.towers == 1),
                "None, or a positive width with towers=1 (P's towers have no such layer)",
            ),
            (
                "num_classes",
                not (self.fc8_split and self.towers == 2) or self.num_classes >= 2,
                "at least 2 when fc8 is split between the towers",
            ),
            ("pooling", self.pooling in POOLINGS, " or ".join(POOLINGS)),
            ("activation", self.activation in ACTIVATIONS, " or ".join(ACTIVATIONS)),
            ("dropout", 0.0 <= self.dropout < 1.0, "a probability in [0, 1)"),
            ("lrn_size", self.lrn_size >= 1, "a positive window size"),
            ("lrn_scope", self.lrn_scope in LRN_SCOPES, "tower (per tower, as P) or all (across the towers, as CF)"),
            (
                "lrn_scope",
                self.lrn_scope == "tower" or (self.lrn and self.towers == 2),
                "tower: all reaches across two towers' LRN, and this net has no LRN or one tower",
            ),
            ("lrn1_input", self.lrn1_input in LRN1_INPUTS, "linear (conv1's output, as K12) or relu (as P's text)"),
            (
                "spatial_norm_size",
                self.spatial_norm_size >= 1 and self.spatial_norm_size % 2 == 1,
                "an odd window size (K12's: 5)",
            ),
            ("spatial_norm_alpha", finite(self.spatial_norm_alpha) and self.spatial_norm_alpha >= 0, "a finite alpha"),
            ("spatial_norm_beta", finite(self.spatial_norm_beta), "a finite power"),
            ("dropout_scale", self.dropout_scale in DROPOUT_SCALES, "test (P 4.2, K12) or train (inverted, C2 and CF)"),
            ("init", self.init in INITS, " or ".join(INITS)),
        ]
        check_fields(self, checks)

    @classmethod
    def one_gpu(cls, **overrides) -> AlexNetConfig:
        """The paper's one-GPU comparison net (P 3.2, footnote 2): half the kernels in conv1 to
        conv4, but the full conv5 and full fully connected layers."""
        fields = dict(towers=1, conv_channels=(48, 128, 192, 192, 256), fc_features=(4096, 4096))
        return cls(**{**fields, **overrides})

    @classmethod
    def seed_mnist(cls, **overrides) -> AlexNetConfig:
        """The seed's network, layer for layer: one full-width tower, grayscale, no LRN, no groups, no
        padding before conv1 (224 -> 54 -> 26 -> 12 -> 5), fc6 and fc7 of 4096, a 1000-unit hidden
        layer, 10 logits, PyTorch's default init; 50,830,786 parameters."""
        fields = dict(
            towers=1,
            lrn=False,
            spatial_norm=False,
            in_channels=1,
            num_classes=10,
            conv1_padding="none",
            fc_hidden=1000,
            init="torch",
            dropout_scale="train",  # nn.Dropout's
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def caffe(cls, **overrides) -> AlexNetConfig:
        """CF's bvlc_alexnet as its deploy.prototxt has it: 227 inputs without padding, LRN k=1 over all
        channels, fc8 split between the towers as any imported fc8 is (its rows: tower A's first)."""
        fields = dict(
            input_size=227,
            lrn_k=1.0,
            lrn_scope="all",
            lrn1_input="relu",
            spatial_norm=False,
            fc8_split=True,
            dropout_scale="train",  # Caffe's dropout layer scales in training
            init="caffe",
        )
        return cls(**{**fields, **overrides})

    @property
    def lrn_across(self) -> bool:
        """Whether the towers' LRN windows reach into each other's channels (Caffe's, `lrn_scope="all"`)."""
        return self.lrn and self.lrn_scope == "all" and self.towers == 2

    @property
    def pool_kernel_stride(self) -> tuple[int, int]:
        return POOLINGS[self.pooling]

    @property
    def conv1_pad(self) -> int:
        """Zeros added on the right and bottom so that conv1 gives 55x55 (0 for 227 inputs and for
        conv1_padding="none")."""
        return 227 - self.input_size if self.conv1_padding == "c2" else 0

    @property
    def map_sizes(self) -> tuple[int, int, int, int]:
        """Height (= width) after conv1, pool1, pool2 and pool5: (55, 27, 13, 6) in P's network,
        (54, 26, 12, 5) in the seed's. conv2 to conv5 keep their input's size."""
        kernel, stride = self.pool_kernel_stride
        conv1 = (self.input_size + self.conv1_pad - 11) // 4 + 1  # 11x11, stride 4 (P 3.5)
        pool1 = (conv1 - kernel) // stride + 1
        pool2 = (pool1 - kernel) // stride + 1
        return conv1, pool1, pool2, (pool2 - kernel) // stride + 1

    @property
    def fc8_out(self) -> tuple[int, ...]:
        """Logits per tower: tower A takes the odd one when the classes do not split evenly."""
        if self.towers == 1:
            return (self.num_classes,)
        if not self.fc8_split:
            return (self.num_classes, 0)
        a = (self.num_classes + 1) // 2
        return (a, self.num_classes - a)


DATASETS = ("imagenet", "mnist", "fashion-mnist", "fake")
# The source of a whole recipe (`--preset`): "k12", the 2012 code as run 145 trained the paper's network
# (K12 layers-145.cfg, layer-params-145.cfg, convdata_jpeg.py), the fields' defaults; "paper", P's text;
# "seed", the seed's MNIST pipeline (its net is --net seed); "caffe", CF's bvlc_alexnet. Each names the
# fields it sets in RECIPES; single flags override. `departures` says where a config leaves K12.
PRESETS = ("k12", "paper", "seed", "caffe")
RECIPES: dict[str, dict[str, dict]] = {
    "k12": {},  # the fields' defaults
    # P's text where it says something else than K12 did: ReLU before LRN1 (3.5), no spatial norm, fc8
    # split between the towers (Figure 2), N(0, 0.01) for every weight (5), one lr and decay for every
    # parameter lowered by hand at plateaus (5), each pixel's own mean (2), the eigenvalue noise scale
    # (4.1), every image its own crop (4.1).
    "paper": {
        "model": dict(lrn1_input="relu", spatial_norm=False, init="paper", fc8_split=True, dropout_scale="test"),
        "data": dict(mean_crop="own", pca_scale="eigenvalue", pca_rescale=False, crop_chunk=1),
        "train": dict(bias_rule="paper", schedule="plateau"),
    },
    "seed": {},  # the pipeline only (normalise, resize to 224, no crops, mean or noise); the rest is K12's
    # CF's bvlc_alexnet, whatever the defaults: its data transformer crops the mean with the image, its
    # solver steps the lr down (here the plateau rule) with the biases at lr_mult 2; the network is
    # AlexNetConfig.caffe. Nothing of K12 reaches an imported checkpoint.
    "caffe": {
        "data": dict(mean_crop="own", pca_scale="eigenvalue", pca_rescale=False, crop_chunk=1),
        "train": dict(bias_rule="convnet", schedule="plateau"),
    },
}
# Where each value that is not K12's comes from, for the run's first lines and --help (a 28x28 set's
# own departure, DIGIT_DEPARTURES, is named as that).
SOURCES = {
    ("lrn1_input", "relu"): "P 3.5's text, C2, CF",
    ("spatial_norm", False): "P's text, C2, CF",
    ("fc8_split", True): "P's Figure 2",
    ("dropout_scale", "train"): "inverted: C2, CF",
    ("lrn_scope", "all"): "CF",
    ("init", "paper"): "P 5's text",
    ("init", "caffe"): "CF",
    ("init", "he"): "He et al. 2015",
    ("init", "torch"): "PyTorch's default",
    ("bias_rule", "paper"): "P 5's text",
    ("schedule", "plateau"): "P 5's text",
    ("mean_crop", "own"): "P 2's text, CF",
    ("pca_scale", "eigenvalue"): "P 4.1's text",
    ("pca_rescale", False): "P's text, CF",
    ("crop_chunk", 1): "P 4.1's text, C2, CF",
    ("lrn", False): "no LRN: P 3.3's ablation, or the seed's network",
    ("pca_noise", False): "no colour noise: P 4.1's ablation",
    ("towers", 1): "one tower: P 3.2's one-GPU net, or the seed's",
    ("conv1_padding", "none"): "the seed's network",
}
# What a pipeline other than K12's (and P's, the same steps) takes away, for the run's first line.
PIPELINES = {
    "seed": "the seed's pipeline: no crops, mean image or colour noise",
    "caffe": "CF's input: 256x256 squash, BGR",
}


def idle_fields(model: AlexNetConfig, data: DataConfig) -> dict[str, str]:
    """The fields that this net or pipeline never reads, each with the reason: a flag that sets one
    would change nothing (the CLI refuses it) and the recipe line leaves it out."""
    idle = {}
    if not model.lrn:
        idle["lrn1_input"] = "the network has no LRN (--no-lrn, or --net seed)"
    if model.dropout == 0:
        idle["dropout_scale"] = "the network has no dropout (--dropout 0)"
    if model.towers == 1:
        idle["fc8_split"] = "a one-tower network has no towers to split fc8 between"
    if data.preset == "seed":
        no_crops = "the seed's pipeline (--preset seed) resizes whole images: no crops, flips, mean image or noise"
        idle |= dict.fromkeys(("mean_crop", "pca_noise", "pca_scale", "pca_rescale", "crop_chunk", "flip"), no_crops)
    elif not data.pca_noise:
        idle |= dict.fromkeys(("pca_scale", "pca_rescale"), "the run has no PCA colour noise (--no-pca-noise)")
    return idle


def departures(model: AlexNetConfig, data: DataConfig, train: TrainConfig) -> list[str]:
    """Where a run leaves K12's run 145, one "field=value (source)" for each field that acts and is not
    K12's (a field its net or pipeline does not have, as LRN1's input without LRN, is left out)."""
    skip = set(idle_fields(model, data))
    said = [f"preset={data.preset} ({PIPELINES[data.preset]})"] if data.preset in PIPELINES else []
    digits = DIGIT_DEPARTURES["data"] if data.dataset in DIGIT_SETS and data.preset == "k12" else {}
    seed_net = model.conv1_padding == "none"  # the seed's own network (--net seed) sets its own fields
    seeds = AlexNetConfig.seed_mnist() if seed_net else None
    for config in (model, data, train):
        k12 = {f.name: f.default for f in dataclasses.fields(config)}
        for field in sorted({f for f, _ in SOURCES} - skip):
            if config is model and seed_net and field in k12 and k12[field] == getattr(config, field):
                if getattr(seeds, field) != k12[field]:  # K12's choice, made by hand on the seed's network
                    said.append(f"{field}={getattr(config, field)} (set by hand on the seed's network)")
            elif field in k12 and getattr(config, field) != k12[field]:
                value = getattr(config, field)
                if config is data and digits.get(field, k12[field]) == value:
                    source = f"the {data.dataset} default, measured: config.DIGIT_DEPARTURES"
                elif config is model and seed_net and getattr(seeds, field) == value:
                    source = "the seed's network, --net seed"
                else:
                    source = SOURCES.get((field, value), "set by hand")
                said.append(f"{field}={value} ({source})")
    return said


def recipe(preset: str, kind: str) -> dict:
    """The fields `preset` sets in the configs of `kind` ("model", "data" or "train")."""
    return dict(RECIPES.get(preset, {}).get(kind, {}))


# Data-loading processes: each is a copy of the loader; past this many it is a mistype, not a machine
WORKERS_LIMIT = 1024
PCA_SCALES = ("eigenvalue", "stdev")
MEAN_CROPS = ("centre", "own")


@dataclass(frozen=True)
class DataConfig(Fields):
    """Where the images come from and how they reach the network (K12 convdata_jpeg.py by default)."""

    # added with the K12 fields (2026-12): each crop lost its own region of the mean image, the noise
    # was not divided out, every image had its own crop
    LEGACY: ClassVar[dict] = dict(mean_crop="own", pca_rescale=False, crop_chunk=1)

    dataset: str = "imagenet"
    data: str | None = None  # a folder; None looks in the dataset's usual places
    # "k12", "paper": short side 256, mean image subtracted, random 224 crops, flips, PCA colour noise
    # (their fields below differ; the recipes in RECIPES).
    # "seed": the seed's run: scale to [0, 1], normalise by seed_mean / seed_std, then resize the whole
    # image to crop_size (the seed's Normalize then Resize((224, 224))).
    # "caffe": CF bvlc_alexnet's input: images squashed to stage_size x stage_size (aspect ratio not
    # kept, as CF's convert_imageset), its mean image subtracted, channels in BGR order, 227 crops.
    preset: str = "k12"
    stage_size: int = 256  # P 2: short side rescaled to 256, centre 256x256 kept
    crop_size: int = 224  # P 4.1; 227 with AlexNetConfig(input_size=227)
    flip: bool | None = None  # None: flips for colour photographs, none for digits and clothes
    pca_noise: bool = True
    pca_alpha_std: float = 0.1  # P 4.1: alpha_i ~ N(0, 0.1)
    # "stdev": Krizhevsky's code, square roots of the eigenvalues on the 0-255 scale (K12 convdata_jpeg.py
    # `color_pca[0]`, C2 alike); "eigenvalue": P 4.1's formula, eigenvalues of the covariance of [0, 1]
    # pixels (fb.resnet.torch's reading).
    pca_scale: str = "stdev"
    # K12 convdata_jpeg.py: the noised crop divided by 1 + pca_alpha_std ("so that the overall scale of
    # the training data doesn't become too different from the test data"). Not in P's text.
    pca_rescale: bool = True
    # Which part of the mean image a crop loses. "centre": the centre crop_size square of the mean image,
    # whatever the crop's offset, and from every test view (K12 convdata_jpeg.py `data_mean_crop`).
    # "own": the crop's own region of the mean image (P 2's "from each pixel"; CF's data transformer).
    mean_crop: str = "centre"
    # Images of a batch that share one crop offset and one flip: K12 draws one for each 32 consecutive
    # images (convdata_jpeg.py `crop_chunk = 32`); 1: every image its own (P 4.1's text, C2, CF).
    crop_chunk: int = 32
    pixel_scale: float = 255.0  # the network sees mean-subtracted 0-255 pixels, as cuda-convnet
    seed_mean: float = 0.1307
    seed_std: float = 0.3081
    fit_images: int | None = 50_000  # images the mean image and PCA are fitted on (None: all)
    subset: int | None = None  # first N training images, for short runs
    strict: bool = False  # an unreadable image stops the run instead of being skipped
    workers: int = 4  # decoding processes for image folders
    # Not in P: a staged folder's JPEGs decoded on the GPU (torchvision decode_jpeg, device="cuda"); off
    # until a GPU has measured it (docs/DATA.md).
    gpu_decode: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("dataset", self.dataset in DATASETS, " or ".join(DATASETS)),
            ("data", self.data is None or self.dataset != "fake", "no folder: the fake dataset is generated"),
            ("preset", self.preset in PRESETS, " or ".join(PRESETS)),
            (
                "preset",
                self.preset != "caffe" or self.dataset == "imagenet",
                "k12, paper or seed: caffe is for ImageNet",
            ),
            ("pca_scale", self.pca_scale in PCA_SCALES, " or ".join(PCA_SCALES)),
            ("mean_crop", self.mean_crop in MEAN_CROPS, "centre (K12's) or own (each crop's own region)"),
            ("crop_chunk", self.crop_chunk >= 1, "a positive number of images (K12's: 32)"),
            ("crop_size", 0 < self.crop_size <= self.stage_size, f"a size up to stage_size={self.stage_size}"),
            ("subset", self.subset is None or self.subset > 0, "a positive number of images"),
            ("fit_images", self.fit_images is None or self.fit_images > 0, "a positive number of images"),
            ("workers", 0 <= self.workers <= WORKERS_LIMIT, "0 (decode in this process) to 1024 worker processes"),
            ("pca_alpha_std", finite(self.pca_alpha_std) and self.pca_alpha_std >= 0, "a finite, non-negative std"),
            ("pixel_scale", finite(self.pixel_scale) and self.pixel_scale > 0, "a finite, positive scale"),
            ("seed_mean", finite(self.seed_mean), "a finite mean"),
            ("seed_std", finite(self.seed_std) and self.seed_std > 0, "a finite, positive std"),
        ]
        check_fields(self, checks)

    @property
    def squash(self) -> bool:
        """Whether images are resized to stage_size x stage_size whole (Caffe's) instead of P 2's short
        side to stage_size and the centre square."""
        return self.preset == "caffe"

    @property
    def flips(self) -> bool:
        return self.flip if self.flip is not None else self.dataset in ("imagenet", "fake")


# The batch when none is named: P 5's 128, except for the 28x28 sets (MNIST, Fashion-MNIST), which
# take the seed's 60: an epoch of 469 steps of 128 is too few updates (docs/TRAINING.md).
SEED_BATCH = 60


def default_batch_size(dataset: str) -> int:
    return SEED_BATCH if dataset in DIGIT_SETS else TrainConfig.batch_size


# Where the defaults for the 28x28 sets leave K12, in one row (ImageNet keeps K12 whole: run 145 trained
# with it). Measured on Fashion-MNIST, one default epoch (experiments/RESULTS.md, "K12 over the full
# default epoch"): K12 whole reached 82.1%, below the 85% the default must reach; K12 with each crop its own
# (crop_chunk=1) 85.x%, with each crop's own mean 84.8%. Why there and not on ImageNet: Fashion-MNIST's
# mean image is a sharp silhouette (its centre crop is off by 24 grey levels rms from a corner crop's own
# region), and with 32 images a chunk a whole half-batch of 60 shares one offset's misfit. The CLI applies
# these under `--preset k12` unless the flag is given, as it picks the batch of these sets.
DIGIT_SETS = ("mnist", "fashion-mnist")
DIGIT_DEPARTURES = {"data": dict(crop_chunk=1)}


OPTIMIZERS = ("paper", "sgd")
AMPS = ("none", "bf16")  # bf16: autocast forward in bfloat16
DIST_TIMEOUT = 10.0  # minutes a collective waits for a silent rank (gloo's and NCCL's own default: 30)
BIAS_RULES = ("paper", "convnet")
SCHEDULES = ("plateau", "2012")
SEED_LIMIT = 2**60  # each step's seeds are made from it (model.layers.step_seed) and must stay below 2^63
LR_SCALINGS = ("none", "linear")


# The alarm keeps its windows of losses in memory (and in every checkpoint): 10^7 steps is 80 MB
ALARM_STEPS_LIMIT = 10**7


@dataclass(frozen=True)
class TrainConfig(Fields):
    """How the network is trained (K12's run 145 by default: layer-params-145.cfg and its comments)."""

    # bias_rule (2026-11): one rule for every parameter before it; schedule (2026-12): the plateau rule
    LEGACY: ClassVar[dict] = dict(bias_rule="paper", schedule="plateau")

    epochs: int = 91  # K12 run 145 stopped after epoch 91 (P 5: "roughly 90 cycles")
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # "paper": v <- m v - wd lr w - lr g; w <- w + v (P 5). "sgd": torch.optim.SGD, which keeps lr
    # outside the momentum buffer and so differs right after an lr drop.
    optimizer: str = "paper"
    # "paper": one lr and weight decay for every parameter, as P 5's text. "convnet": biases learn at
    # twice the weights' lr and have no weight decay (cuda-convnet's layer params epsB = 2 epsW, wc on
    # weights only; CF lr_mult 2, decay_mult 0 on biases). Default "convnet": what Krizhevsky's code and
    # CF ran with the paper's net (experiments/RESULTS.md, "Initialisation"); `--bias-rule paper` is P 5's text.
    bias_rule: str = "convnet"
    # "plateau": P 5's text, the lr divided by 10 when the validation error stops improving (`lr_drops`
    # times, after `lr_patience` epochs without improvement), biases with the weights. "2012": run 145's
    # recorded schedule (K12 layer-params-145.cfg's comments), each change at the same fraction of
    # `epochs` as of its 91: the weights' lr / 10 from epochs 25, 51 and 79; conv1's 1e-5 from 67 and
    # conv1 frozen from 72; the colour noise off from 67; the biases' lr never lowered (epsB 0.02 in
    # every file after a drop). `alexnet2gpu.train.optim.Recorded` says which epochs a run gets.
    schedule: str = "2012"
    lr_drops: int = 3  # P 5: lr divided by 10 when the validation error stops improving, three times
    lr_patience: int = 1  # epochs without improvement before a drop
    warmup_steps: int = 0  # not in P: lr rises linearly over the first N steps (steadies short runs)
    # How the lr goes with the global batch -b (more tower pairs, a larger -b). "none": the lr is --lr
    # whatever -b (P 5: 0.01 at 128). "linear": --lr is the lr of a batch of 128, scaled by -b / 128
    # (Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 2.1; their 2.2 adds a warm-up:
    # --warmup-steps).
    lr_scaling: str = "none"
    seed: int = 0
    max_steps: int | None = None  # total steps of the run, counted across resumes
    val_subset: int | None = None  # first N validation images (None: all)
    amp: str = "none"  # "bf16": autocast forward in bfloat16
    channels_last: bool = False
    compile: bool = False
    log_every: int = 10
    # Where and how the CLI runs it, kept so that a resume without the flags runs as the run did:
    # `--devices` as given (None: the default placement) and `--no-tensorboard`. loop.train takes
    # its devices and tensorboard as arguments and does not read these.
    devices: str | None = None
    tensorboard: bool = True
    # The stuck-loss alarm (alexnet2gpu.train.alarm) judges mean losses, never one noisy batch; why
    # these thresholds: docs/TRAINING.md.
    alarm_window: int = 10  # diverging: the mean of the last 10 steps
    alarm_after_steps: int = 20  # the first steps may overshoot and come back: "diverging" waits for them
    alarm_diverge_factor: float = 1.5  # diverging: that mean above 1.5 ln(classes)
    alarm_flat_margin: float = 0.02  # flat: within 2% of ln(classes), chance's loss
    alarm_flat_epochs: float = 0.5  # ... over the last half epoch
    alarm_flat_steps: int = 100  # ... and at least 100 steps (0: no flat alarm)

    @property
    def base_lr(self) -> float:
        """The lr the run starts its schedule from: --lr, times -b / 128 under the linear rule."""
        return self.lr * (self.batch_size / 128 if self.lr_scaling == "linear" else 1.0)

    def __post_init__(self) -> None:
        checks = [
            ("optimizer", self.optimizer in OPTIMIZERS, " or ".join(OPTIMIZERS)),
            ("seed", isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT, "a seed from 0 to 2^60 - 1"),
            ("bias_rule", self.bias_rule in BIAS_RULES, " or ".join(BIAS_RULES)),
            ("schedule", self.schedule in SCHEDULES, "plateau (P 5's text) or 2012 (run 145's recorded epochs)"),
            ("lr_scaling", self.lr_scaling in LR_SCALINGS, " or ".join(LR_SCALINGS)),
            ("amp", self.amp in AMPS, " or ".join(AMPS)),
            ("batch_size", self.batch_size > 0, "a positive batch size"),
            ("epochs", self.epochs > 0, "a positive number of epochs"),
            ("lr", finite(self.lr) and self.lr > 0, "a finite, positive learning rate"),
            ("momentum", finite(self.momentum) and 0 <= self.momentum < 1, "a momentum in [0, 1) (the paper's: 0.9)"),
            ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, "a finite weight decay >= 0"),
            ("lr_drops", self.lr_drops >= 0, "0 or more lr drops"),
            ("lr_patience", self.lr_patience >= 0, "0 or more epochs"),
            ("warmup_steps", self.warmup_steps >= 0, "0 (no warm-up) or more steps"),
            ("alarm_window", 0 < self.alarm_window <= ALARM_STEPS_LIMIT, "a positive number of steps, at most 10^7"),
            ("alarm_after_steps", self.alarm_after_steps >= 0, "0 or more steps"),
            (
                "alarm_diverge_factor",
                finite(self.alarm_diverge_factor) and self.alarm_diverge_factor > 0,
                "a ratio > 0",
            ),
            ("alarm_flat_margin", finite(self.alarm_flat_margin) and self.alarm_flat_margin >= 0, "a ratio >= 0"),
            ("alarm_flat_epochs", finite(self.alarm_flat_epochs) and 0 <= self.alarm_flat_epochs <= 1000, "0 to 1000"),
            (
                "alarm_flat_steps",
                0 <= self.alarm_flat_steps <= ALARM_STEPS_LIMIT,
                "0 (no flat alarm) or a number of steps, at most 10^7",
            ),
            ("max_steps", self.max_steps is None or self.max_steps > 0, "a positive number of steps"),
            ("val_subset", self.val_subset is None or self.val_subset > 0, "a positive number of images"),
            ("log_every", self.log_every > 0, "a positive number of steps"),
        ]
        check_fields(self, checks)


SUBSAMPLINGS = ("4:2:0", "4:4:4")


@dataclass(frozen=True)
class StageConfig(Fields):
    """How `python -m alexnet2gpu stage` stores a folder's images once at the paper's size."""

    size: int = 256  # P 2: short side rescaled to 256, centre 256x256 kept
    quality: int = 95  # C2 stores its 256x256 images as JPEG quality 95 (make-data/pyext/include/pyext.h)
    # Full colour resolution, where C2's encoder (OpenCV) halves it (4:2:0): closer to the live path's
    # pixels, slower to decode (docs/DATA.md, "The staged format")
    subsampling: str = "4:4:4"
    shard_images: int = 2048  # sources per shard: about 80 MB of JPEGs, seconds of one core's work

    def __post_init__(self) -> None:
        checks = [
            ("size", self.size > 0, "a positive size"),
            ("quality", 1 <= self.quality <= 100, "a JPEG quality from 1 to 100"),
            ("subsampling", self.subsampling in SUBSAMPLINGS, " or ".join(SUBSAMPLINGS)),
            ("shard_images", self.shard_images > 0, "a positive number of images"),
        ]
        check_fields(self, checks)
