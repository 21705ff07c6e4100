"""The one registry of model families: data, input size, normalisation, classes, recipes, card text.

A *family* is an architecture trained on one dataset (``resnet18-cifar10``); a *variant* is one
member of the family's zoo (``fp32``, ``int8``, ``sparse90``). The networks themselves are
described apart, in :mod:`surgery.architectures` (builder, first convolution and classifier,
blocks and stages, GradCAM layer); a family names one and sets its options. Every model built
here takes images in [0, 1]: normalisation is the model's first operation, so attribution maps,
activation maximisation and the app all work in plain pixel space.

Example:
    >>> from surgery.registry import get_family, build_model
    >>> family = get_family("resnet18-shapes")
    >>> model = build_model(family)
    >>> model(torch.rand(1, 3, family.input_size, family.input_size)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torchvision
from torch import nn

from surgery.architectures import Stem, build_from_architecture, get_architecture, load_pretrained
from surgery.data.fashion_mnist import FASHION_MNIST_CLASSES
from surgery.data.shapes import SHAPE_CLASSES
from surgery.variants import DEFAULT_ZOO, VariantSpec

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """A training schedule: warm-up, then step decay at ``milestones`` (epochs) or cosine decay."""

    epochs: int
    lr: float
    batch_size: int
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    optimizer: str = "sgd"  # or "adamw"
    steps_per_epoch: int | None = None  # truncate epochs (short fine-tuning, smoke runs)
    autocast: str | None = None  # "bfloat16": mixed-precision forward, weights and optimiser stay FP32
    label_smoothing: float = 0.0  # cross-entropy target smoothing (Szegedy et al. 2016)
    quantizer_lr_scale: float = 1.0  # quantizer ranges learn at lr x this (their own group; 0 freezes them)
    distill_temperature: float | None = None  # fit the FP32 model's outputs (KL at this temperature), not labels
    freeze_batchnorm: bool = False  # BatchNorm keeps its running statistics while the rest trains
    image_size: int | None = None  # train on the batches resized to this side (evaluation stays at the input size)
    # Images (at ``image_size``) on which a compressed variant's layers are refitted to FP32's outputs one
    # by one before any fine-tuning (training.reconstruction: pruned weights refitted, quantized ones
    # rounded with GPTQ's error compensation); 0: none.
    reconstruction_samples: int = 0
    # The refit's ridge towards FP32's weights, as a fraction of the mean diagonal of the layer's input
    # moments (training.reconstruction). 0.01 is SparseGPT's numerical damping; where the images are
    # unlike the data the model was trained on, a larger one keeps the fit from learning them.
    reconstruction_damping: float = 0.01
    # Synthetic images (training.synthetic: drawn from FP32's BatchNorm statistics, ZeroQ) added to the
    # refit's ``reconstruction_samples`` images, at the same size; 0: none.
    synthetic_samples: int = 0
    # Activations quantized with a zero point (NNCF's MIXED preset), not symmetrically around 0: the
    # residual sums of MobileNetV2 are signed and skewed, so a symmetric range wastes levels on them.
    asymmetric_activations: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> "Recipe":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class CompressionRecipe:
    """How a family's compressed variants are derived from its FP32 model, per rung of the ladder.

    ``quantized`` maps a bit width to the QAT recipe used for variants whose *lowest* width
    (weights or activations) is at least that, the nearest one below it applying: with
    ``{8: a, 4: b, 2: c}``, ``int8`` gets ``a``, ``w4a8``, ``int4``..``int7`` get ``b`` and
    ``int3``, ``int2`` get ``c``. ``sparse`` maps a sparsity level to the fine-tuning of every
    target up to it, the nearest one above applying (``{0.9: a, 0.99: b}``: ``sparse50`` and
    ``sparse90`` get ``a``, ``sparse95`` gets ``b``). So any variant name finds its recipe from
    :func:`surgery.variants.parse_variant` alone, with no case per name. A post-training variant
    (``int8-ptq``) gets its rung's recipe with no epochs: calibration and corrections alone.
    """

    quantized: dict[int, Recipe]
    sparse: dict[float, Recipe]
    calibration_samples: int = 512
    sparsity: float = 0.9  # the default target of ``python -m training sparse``
    sparsity_ramp: float = 0.5  # masks grow from 0 to the target over this fraction of fine-tuning
    activation_ranges: str = "mean_minmax"  # how calibration sets activation ranges (surgery.compression.ACTIVATION_RANGES)
    # Which layers the zeros of a sparse variant go to: "global" (one magnitude threshold over all weights),
    # "per_layer" (every layer at the target) or "lamp" (the per-layer zeros re-allocated by LAMP scores,
    # training.masks).
    sparsity_allocation: str = "global"
    # Images on which BatchNorm statistics are matched to FP32's after calibrating and after each growth of
    # the sparsity masks (training.batchnorm); 0 leaves them as they are.
    batchnorm_correction: int = 0
    bias_correction: bool = True  # NNCF's fast bias correction after calibrating
    # Conv and linear layers with fewer weights than this stay dense in sparse variants; the others are
    # pruned further, so that the target holds over all weights (MobileNetV2's small layers are the
    # ones magnitude pruning breaks).
    dense_below: int = 0

    def for_variant(self, spec: VariantSpec) -> Recipe:
        """The fine-tuning recipe of a compressed variant (``ValueError`` for FP32)."""
        if spec.kind == "quantized":
            bits = min(spec.weight_bits, spec.activation_bits)
            tiers = [b for b in sorted(self.quantized, reverse=True) if b <= bits]
            recipe = self.quantized[tiers[0] if tiers else min(self.quantized)]
            return replace(recipe, epochs=0) if spec.post_training else recipe
        if spec.kind == "sparse":
            tiers = [level for level in sorted(self.sparse) if level >= spec.sparsity - 1e-9]
            return self.sparse[tiers[0] if tiers else max(self.sparse)]
        raise ValueError(f"{spec.name} is not a compressed variant: FP32 models use ModelFamily.fp32")


@dataclass(frozen=True)
class DatasetCard:
    """What a model card says about a family's data: source, licence, citation, published anchor."""

    name: str
    url: str
    licence: str
    citation: str
    anchor: str  # a published result on the same data, for comparison


@dataclass(frozen=True)
class ModelFamily:
    """Everything that defines a family; the single source the trainer, loader and app read."""

    name: str
    arch: str
    dataset: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    fp32: Recipe
    compression: CompressionRecipe
    arch_options: dict[str, Any] = field(default_factory=dict)  # the architecture's options (its docs)
    pretrained: str | None = None  # torchvision weights (``IMAGENET1K_V1``): the FP32 model starts from them
    # torchvision's weights of independent training runs with other recipes: fp32-recipe1, ... (a
    # pretrained family's only controls, where torchvision's download can be reached)
    other_recipes: tuple[str, ...] = ()
    train_samples: int | None = None  # generated datasets only
    eval_samples: int | None = None
    description: str = ""
    grayscale: bool = False  # gray images replicated to RGB: the app shows the model's view in gray
    dataset_card: DatasetCard | None = None  # what model cards say about the data
    extra: dict = field(default_factory=dict)
    zoo: tuple[str, ...] = DEFAULT_ZOO  # what ``python -m training zoo`` builds without --variants

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_fp32_seeds(self) -> bool:
        """Whether FP32 is trained here, so that another seed is another model (the null of the
        study). A family whose FP32 is torchvision's weights as they are (0 epochs) has none."""
        return self.pretrained is None or self.fp32.epochs > 0

    def fp32_weights(self, spec: VariantSpec) -> str | None:
        """The torchvision weights an FP32 variant starts from: ``pretrained``, or for
        ``fp32-recipe<k>`` the k-th of ``other_recipes`` (``ValueError`` where there is none)."""
        if not spec.recipe:
            return self.pretrained
        if spec.recipe > len(self.other_recipes):
            raise ValueError(f"{self.name} has no {spec.name}: "
                             + (f"its other training runs are {', '.join(self.other_recipes)}" if self.other_recipes
                                else "no other training run of its FP32 is known"))
        return self.other_recipes[spec.recipe - 1]

    def architecture(self) -> dict:
        """What ``build_model`` needs, as stored in every checkpoint's config."""
        return get_architecture(self.arch).config(self.num_classes, self.input_size, self.mean, self.std,
                                                  **self.arch_options)


# Sized for 2 CPU cores with native bfloat16 (AVX-512 bf16 / AMX), where a training step of this
# ResNet18 (~0.22 GMAC a 28x28 image, layer4 0.13) costs ~3.4 ms an image on two cores: five epochs
# of one-cycle AdamW (2,345 steps of 128) leave room for INT8 and sparse90 in the 30-minute budget.
# Without native bfloat16 the same steps cost about twice as much (README).
# On a GPU, the anchor's setting (ResNet18 + crop/flip, 94.9%) is a full-length schedule, e.g.
# ``--epochs 60 --lr 0.1`` with ``Recipe(epochs=60, lr=0.1, batch_size=128, weight_decay=5e-4,
# warmup_epochs=1)`` (SGD, cosine); not measured here.
FASHION_CPU_RECIPE = Recipe(epochs=5, lr=2e-3, batch_size=128, optimizer="adamw", weight_decay=0.05,
                            warmup_epochs=0.25, label_smoothing=0.1, autocast="bfloat16")


def _imagenet_classes() -> tuple[str, ...]:
    # The class list ships inside torchvision's weight metadata (the same for every network's
    # ImageNet weights): no download needed.
    return tuple(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


# Fine-tuning on photo crops, which have no labels: distilled from FP32 (KL at T=2) with BatchNorm's
# statistics frozen, for 0 epochs until a rung's recipe gives it some.
_PHOTO_DISTILLATION = Recipe(epochs=0, lr=1e-5, batch_size=32, optimizer="adamw", weight_decay=0.0,
                             distill_temperature=2.0, freeze_batchnorm=True)

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily(
            name="resnet18-cifar10",
            arch="resnet18",
            dataset="cifar10",
            input_size=32,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            class_names=CIFAR10_CLASSES,
            arch_options={"cifar_stem": True},
            fp32=Recipe(epochs=50, lr=0.05, batch_size=512, milestones=(25, 40)),
            # GPU-scale (not run here): low bits and high sparsity fine-tune longer at lower rates,
            # as in LSQ's ResNet18 schedules scaled to CIFAR-10.
            compression=CompressionRecipe(
                quantized={
                    8: Recipe(epochs=5, lr=0.001, batch_size=512, milestones=(3,)),
                    4: Recipe(epochs=30, lr=1e-3, batch_size=256, weight_decay=1e-4, warmup_epochs=1,
                              quantizer_lr_scale=10.0),
                    2: Recipe(epochs=60, lr=5e-4, batch_size=256, weight_decay=5e-5, warmup_epochs=1,
                              quantizer_lr_scale=10.0),
                },
                sparse={
                    0.9: Recipe(epochs=15, lr=0.005, batch_size=512, milestones=(10,)),
                    0.99: Recipe(epochs=40, lr=0.005, batch_size=512, milestones=(30,)),
                },
            ),
            description="The seed's network: torchvision ResNet18, 3x3 stride-1 conv1, no max-pool.",
        ),
        ModelFamily(
            name="resnet50-imagenet",
            arch="resnet50",
            dataset="imagenet",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            class_names=_imagenet_classes(),
            pretrained="IMAGENET1K_V2",
            # 0 epochs: torchvision's weights are the FP32 model; --epochs 90 trains from scratch.
            fp32=Recipe(epochs=0, lr=0.1, batch_size=256, weight_decay=1e-4, milestones=(30, 60, 80)),
            # GPU-scale (not run here); LSQ trains 4/3/2-bit ResNets on ImageNet for 90 epochs from FP32.
            compression=CompressionRecipe(
                quantized={
                    8: Recipe(epochs=1, lr=1e-4, batch_size=128, weight_decay=1e-4),
                    4: Recipe(epochs=10, lr=1e-3, batch_size=256, weight_decay=5e-5, warmup_epochs=0.5,
                              quantizer_lr_scale=10.0),
                    2: Recipe(epochs=30, lr=1e-3, batch_size=256, weight_decay=2.5e-5, warmup_epochs=0.5,
                              quantizer_lr_scale=10.0),
                },
                sparse={
                    0.9: Recipe(epochs=10, lr=0.01, batch_size=256, weight_decay=1e-4, milestones=(7,)),
                    0.99: Recipe(epochs=30, lr=0.01, batch_size=256, weight_decay=1e-4, milestones=(20,)),
                },
                calibration_samples=1024,
            ),
            description="torchvision ResNet50 at 224x224; FP32 starts from torchvision's ImageNet weights.",
        ),
        ModelFamily(
            name="resnet18-shapes",
            arch="resnet18",
            dataset="shapes",
            input_size=64,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            class_names=SHAPE_CLASSES,
            arch_options={"last_stage_stride": 1},
            # 640 steps of 32 (2 epochs of 10,240 images): >= 97% on the held-out 1,000 over seeds, with
            # or without native bfloat16 (README). Half the steps (5,120 images) stopped at 91.6-95.7%;
            # at the same number of images, batches of 32 beat batches of 64 (more updates).
            fp32=Recipe(epochs=2, lr=3e-3, batch_size=32, optimizer="adamw", weight_decay=5e-4,
                        warmup_epochs=0.3, autocast="bfloat16"),
            # Sized for 2 CPU cores (~1.2 s a QAT step at 4 bits, ~0.5 s a sparse step); the figures
            # these recipes give are in the README. Low bits: longer, lower learning rate, ranges
            # trained faster than the weights; higher sparsity: longer fine-tuning.
            compression=CompressionRecipe(
                quantized={
                    8: Recipe(epochs=1, lr=2e-3, batch_size=64, steps_per_epoch=16),
                    4: Recipe(epochs=4, lr=1e-4, batch_size=64, optimizer="adamw", weight_decay=0.0,
                              steps_per_epoch=24, quantizer_lr_scale=10.0),
                    3: Recipe(epochs=6, lr=1e-4, batch_size=64, optimizer="adamw", weight_decay=0.0,
                              steps_per_epoch=24, quantizer_lr_scale=10.0),
                    2: Recipe(epochs=8, lr=2e-4, batch_size=64, optimizer="adamw", weight_decay=0.0,
                              steps_per_epoch=32, warmup_epochs=0.25, quantizer_lr_scale=10.0),
                },
                sparse={
                    0.9: Recipe(epochs=2, lr=5e-4, batch_size=64, optimizer="adamw", steps_per_epoch=32,
                                autocast="bfloat16"),
                    0.95: Recipe(epochs=4, lr=5e-4, batch_size=64, optimizer="adamw", steps_per_epoch=32,
                                 autocast="bfloat16"),
                    0.99: Recipe(epochs=6, lr=5e-4, batch_size=64, optimizer="adamw", steps_per_epoch=32,
                                 autocast="bfloat16"),
                },
                calibration_samples=512,
                sparsity_ramp=0.35,
            ),
            train_samples=10240,
            eval_samples=1000,
            description="Offline family: ResNet18 (layer4 at stride 1: 4x4 maps at 64x64) on generated shapes with masks.",
        ),
        ModelFamily(
            name="resnet18-fashionmnist",
            arch="resnet18",
            dataset="fashion-mnist",
            input_size=28,
            # Fashion-MNIST's training-set pixel mean and std, the same for the three replicated channels.
            mean=(0.2860, 0.2860, 0.2860),
            std=(0.3530, 0.3530, 0.3530),
            class_names=FASHION_MNIST_CLASSES,
            # 28 -> 14 (stem) -> 14, 7, 4, 4 (layer4 at stride 1): 4x4 GradCAM maps.
            arch_options={"stem": Stem(kernel=3, stride=2, maxpool=False), "last_stage_stride": 1},
            grayscale=True,
            fp32=FASHION_CPU_RECIPE,
            compression=CompressionRecipe(
                # QAT is ~3x the cost of an FP32 step: short fine-tuning after calibration; low bits
                # longer, ranges trained faster than the weights (as for shapes).
                quantized={
                    8: Recipe(epochs=1, lr=1e-4, batch_size=128, optimizer="adamw", weight_decay=0.05,
                              steps_per_epoch=40),
                    4: Recipe(epochs=1, lr=1e-4, batch_size=128, optimizer="adamw", weight_decay=0.0,
                              steps_per_epoch=120, quantizer_lr_scale=10.0),
                    2: Recipe(epochs=2, lr=2e-4, batch_size=128, optimizer="adamw", weight_decay=0.0,
                              steps_per_epoch=120, warmup_epochs=0.1, quantizer_lr_scale=10.0),
                },
                # 120 steps (15,360 images): masks ramp to 90% over the first half, the rest recovers.
                sparse={
                    0.9: Recipe(epochs=1, lr=1e-3, batch_size=128, optimizer="adamw", weight_decay=0.05,
                                warmup_epochs=0.05, steps_per_epoch=120, label_smoothing=0.1, autocast="bfloat16"),
                    0.99: Recipe(epochs=2, lr=1e-3, batch_size=128, optimizer="adamw", weight_decay=0.05,
                                 warmup_epochs=0.05, steps_per_epoch=120, label_smoothing=0.1, autocast="bfloat16"),
                },
                calibration_samples=512,
                sparsity_ramp=0.5,
            ),
            dataset_card=DatasetCard(
                name="Fashion-MNIST",
                url="https://github.com/zalandoresearch/fashion-mnist",
                licence="MIT (Copyright (c) 2017 Zalando SE)",
                citation="Han Xiao, Kashif Rasul, Roland Vollgraf. Fashion-MNIST: a Novel Image Dataset for "
                         "Benchmarking Machine Learning Algorithms. arXiv:1708.07747, 2017.",
                anchor="Zalando's benchmark table: ResNet18 with augmentation (random crop, horizontal flip) "
                       "94.9% test accuracy; WRN-40-4 96.7%; a two-layer CNN 91.6%.",
            ),
            description="Real images offline: ResNet18 (3x3 stride-2 stem, layer4 at stride 1: 4x4 maps) on "
                        "Zalando's Fashion-MNIST (28x28 gray, replicated to RGB), from Debian's "
                        "dataset-fashion-mnist.",
        ),
        ModelFamily(
            name="mobilenetv2-imagenet",
            arch="mobilenet_v2",
            dataset="imagenet",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            class_names=_imagenet_classes(),
            pretrained="IMAGENET1K_V1",
            # Trained independently by torchvision with its newer recipe (ImageNet-val top-1 72.154%).
            other_recipes=("IMAGENET1K_V2",),
            # 0 epochs: torchvision's weights are the FP32 model (no training, no seeds); --epochs N
            # trains on --data-root from random weights (SGD; torchvision's own recipe is 300 epochs).
            fp32=Recipe(epochs=0, lr=0.045, batch_size=256, weight_decay=4e-5, milestones=(100, 200, 250)),
            # Derived from photo crops alone (surgery.data.photos: augmented crops of the FIT photos,
            # distilled from this FP32 model, no labels), sized for 2 CPU cores; the figures they give
            # (held-out agreement, labelled top-1, build time) are in the README. Measured there:
            # INT8 needs no refit and no bias correction (NNCF's lowered the agreement and costs time:
            # off, BatchNorm matching does that work; GPTQ's refit gave 83% against 85%); at 4 bits
            # calibration collapses (agreement 4%) until the BatchNorm statistics are matched to FP32's
            # (65-70%), and distillation after that lowered the agreement at 30-60 steps; refitting
            # each layer to FP32's outputs and rounding it with GPTQ's error compensation first
            # (training.reconstruction) gives W4A8 73-79% (at 160 px: 71%), 83% with the refit's damping
            # at 0.3 (below). Magnitude pruning breaks
            # the network (sparse50, every layer at 50%: one-shot agreement 0%, 13% after BatchNorm
            # matching; a ramp over 24 distillation steps: 8%). Its small layers (depthwise, early
            # pointwise; 9% of the weights) are the fragile ones: spared, with the other layers at
            # 54.7%, one-shot agreement is 9%, and refitting every layer to FP32's outputs on 256
            # crops (training.reconstruction) brings it to 60-63%, 68% with the damping at 0.3 (README).
            compression=CompressionRecipe(
                # INT8: calibration, then 60 steps of distillation (chosen on held-out synthetic images,
                # bench/bench_recipes.py: KL 0.122 against 0.174 for calibration alone, README); the first
                # page derives int8-ptq, its calibration alone, in a minute. Below 8 bits every layer
                # refitted and rounded on 256 crops, no fine-tuning (--epochs N adds distillation).
                # INT8's activations get zero points (held-out agreement 90.0% against 86.6% symmetric, same
                # calibration draw); W4A8's stay symmetric (asymmetric: 62.8% against 73.4%).
                quantized={8: replace(_PHOTO_DISTILLATION, epochs=1, steps_per_epoch=60, lr=2e-5,
                                      asymmetric_activations=True),
                           4: replace(_PHOTO_DISTILLATION, reconstruction_samples=256, reconstruction_damping=0.3)},
                # No fine-tuning: the masks at once, then every layer refitted on 256 crops and 64 synthetic
                # images (drawn from FP32's BatchNorm statistics, training.synthetic) at 160 px. Both refits'
                # ridge towards FP32's weights is 0.3 of the mean input moment, not SparseGPT's 0.01: the FIT
                # photos are unlike ImageNet, and a closer fit to them moved the variants away from FP32 on
                # the held-out photos (README: W4A8 73% -> 83%, sparse50 60% -> 68%).
                sparse={0.99: Recipe(epochs=0, lr=0.0, batch_size=32, image_size=160, reconstruction_samples=256,
                                     reconstruction_damping=0.3, synthetic_samples=64)},
                calibration_samples=512,  # 128 gave INT8 85.3% agreement and -4.4 labelled points, 512: 86.6%, -2.5 (both symmetric)
                sparsity_ramp=0.5,
                # Per-layer masks moved between layers by LAMP: chosen on held-out synthetic images
                # (bench/bench_recipes.py; synthetic KL 0.789 against 1.014 per layer, photo agreement 48%
                # against 68%: the photo crops do not rank recipes as ImageNet does, README).
                sparsity_allocation="lamp",
                batchnorm_correction=64,
                bias_correction=False,
                dense_below=30_000,
            ),
            zoo=("fp32", "int8", "int8-ptq", "w4a8", "int4", "sparse50", "sparse75", "sparse90"),
            dataset_card=DatasetCard(
                name="ImageNet-1k (ILSVRC 2012)",
                url="https://image-net.org/",
                licence="ImageNet's terms of access (non-commercial research and education)",
                citation="Olga Russakovsky et al. ImageNet Large Scale Visual Recognition Challenge. IJCV, 2015.",
                anchor="torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 (this FP32 model): 71.878% top-1, "
                       "90.286% top-5 on ImageNet-val; Sandler et al. 2018 report 72.0%.",
            ),
            description="A real ImageNet CNN offline: torchvision's MobileNetV2 at 224x224; FP32 is torchvision's "
                        "pretrained IMAGENET1K_V1 weights (ImageNet-val top-1 71.878%), unchanged.",
        ),
        ModelFamily(
            name="mobilenetv2-shapes",
            arch="mobilenet_v2",
            dataset="shapes",
            input_size=64,
            mean=IMAGENET_MEAN,  # what torchvision's features expect
            std=IMAGENET_STD,
            class_names=SHAPE_CLASSES,
            # The last downsampling dropped: 4x4 maps at 64x64, as resnet18-shapes has.
            arch_options={"last_stage_stride": 1},
            # Transfer learning: torchvision's ImageNet features, a new 10-class classifier, fine-tuned.
            pretrained="IMAGENET1K_V1",
            fp32=Recipe(epochs=1, lr=1e-3, batch_size=32, optimizer="adamw", weight_decay=1e-4,
                        warmup_epochs=0.2, autocast="bfloat16"),
            compression=CompressionRecipe(
                quantized={8: Recipe(epochs=1, lr=1e-4, batch_size=64, optimizer="adamw", weight_decay=0.0,
                                     steps_per_epoch=16)},
                sparse={0.99: Recipe(epochs=2, lr=5e-4, batch_size=64, optimizer="adamw", steps_per_epoch=32)},
                calibration_samples=512,
                sparsity_ramp=0.35,
            ),
            train_samples=5120,
            eval_samples=1000,
            description="MobileNetV2 offline on the generated shapes with masks: torchvision's ImageNet weights "
                        "fine-tuned (last stage at stride 1: 4x4 maps at 64x64); the depthwise architecture in "
                        "every tool, in minutes.",
        ),
    )
}


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name``; raises ``KeyError`` listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}") from None


def build_model(family: ModelFamily | str, pretrained: bool | str = False) -> nn.Module:
    """Build a family's network; ``pretrained`` loads torchvision's weights (the family's, or those
    named, e.g. ``"IMAGENET1K_V2"``; found or fetched, checked: :func:`surgery.architectures.load_pretrained`)."""
    family = get_family(family) if isinstance(family, str) else family
    model = build_from_architecture(family.architecture())
    if pretrained:
        name = pretrained if isinstance(pretrained, str) else family.pretrained
        if name is None:
            raise ValueError(f"{family.name} has no pretrained torchvision weights")
        load_pretrained(model, name)
    return model
