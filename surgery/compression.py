"""The one module that knows NNCF: quantize, prune, bake masks, serialise and restore.

NNCF 3.x inserts its compression modules as hooks (under a ``__nncf_hooks`` submodule) and
keeps the model's own class and attributes, so ``model.layer4`` still works on an INT8 or a
sparse model, and so does its architecture description (``model.architecture``).
Everything else in the project goes through these functions, so an NNCF upgrade touches one file.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ContextManager

# NNCF compiles its CPU extension on the first INT8 forward and gives up after 60 s by default;
# on a busy 2-core machine the compile takes longer (seen here), which would crash training or
# the app's start-up. A user's own setting is kept.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")

import nncf  # noqa: E402  (after the timeout above)
import nncf.torch  # noqa: E402
import torch
from nncf.common.quantization.structs import QuantizationScheme
from nncf.quantization.advanced_parameters import QuantizationParameters
from nncf.quantization.range_estimator import RangeEstimatorParametersSet
from nncf.torch.function_hook.pruning.magnitude.schedulers import ExponentialMagnitudePruningScheduler
from nncf.torch.function_hook.hook_executor_mode import disable_function_hook_mode
from nncf.torch.function_hook.wrapper import get_hook_storage, is_wrapped
from nncf.torch.quantization import extensions as _extensions
from nncf.torch.quantization.layers import BaseQuantizer, SymmetricQuantizer
from nncf.torch.quantization.reference import ReferenceQuantizedFunctions
from torch import nn

from surgery.architectures import architecture_of

logger = logging.getLogger(__name__)

NNCF_VERSION = nncf.__version__
SPARSITY_MODE = nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL


FIRST_LAST_BITS = 8  # the first convolution and the classifier, whatever the variant's bit width (LSQ)


# How activation ranges are estimated from the calibration images: NNCF's default (the mean over
# batches of each batch's min and max) or its histogram estimator (the range minimising the
# quantization error of the pooled histogram, which clips rare outliers).
ACTIVATION_RANGES = {"mean_minmax": None, "histogram": RangeEstimatorParametersSet.HISTOGRAM}


def quantize(model: nn.Module, batches: Iterable[torch.Tensor], num_samples: int,
             weight_bits: int = 8, activation_bits: int = 8, activation_ranges: str = "mean_minmax",
             keep_depthwise: bool = False, bias_correction: bool = True,
             asymmetric_activations: bool = False) -> nn.Module:
    """Post-training quantization: weights per-channel symmetric at ``weight_bits``, activations at
    ``activation_bits``; the first convolution and the classifier (weights and input) at 8 bits.

    ``batches`` yields image batches; ``num_samples`` is how many *images* calibrate the ranges
    (NNCF's ``subset_size`` counts dataset items, here batches, so it is converted). Returns a
    quantized deep copy, ready for quantization-aware training with an ordinary torch loop.

    W8A8 uses NNCF's CPU preset. Below 8 bits NNCF's CPU tables refuse the widths, so the model is
    quantized with the NPU tables at 4 bits (which allow 4-bit convolution weights and
    activations), then every quantizer is set to its width (2, 3, ... 8 bits; NNCF allows 3 bits
    nowhere and 2 only for depthwise convolutions) with :func:`set_bit_widths`. Low-bit practice
    (LSQ, Esser et al. 2020; PACT, Choi et al. 2018) keeps the first and last layers at 8 bits;
    a weight quantizer whose calibrated range was set for another width gets its per-channel scale
    re-fitted (least squared error) for the new one. ``activation_ranges`` is a key of
    :data:`ACTIVATION_RANGES`. ``keep_depthwise`` keeps depthwise convolutions (weights and
    inputs) at 8 bits too (variant suffix ``-dw8``). ``bias_correction`` runs NNCF's fast bias
    correction after calibrating (off: faster, e.g. where BatchNorm statistics are matched instead).
    ``asymmetric_activations`` gives activation quantizers a zero point (NNCF's MIXED preset: weights
    stay symmetric).

    Example:
        >>> int4 = quantize(fp32, batches, 512, weight_bits=4, activation_bits=4)
        >>> sorted(set(bit_widths(int4).values()))
        [4, 8]
    """
    for bits in (weight_bits, activation_bits):
        if not 2 <= bits <= 8:
            raise ValueError(f"bit widths must be between 2 and 8, got {bits}")
    if activation_ranges not in ACTIVATION_RANGES:
        raise ValueError(f"activation_ranges must be one of {sorted(ACTIVATION_RANGES)}, got {activation_ranges!r}")
    estimator = ACTIVATION_RANGES[activation_ranges]
    ranges = {} if estimator is None else {"activations_range_estimator_params": estimator}
    ranges["disable_bias_correction"] = not bias_correction
    preset = {"preset": nncf.QuantizationPreset.MIXED} if asymmetric_activations else {}
    batches = list(_take_images(batches, num_samples))
    logger.info("calibrating W%dA%d quantizers on %d images in %d batches", weight_bits, activation_bits,
                sum(len(b) for b in batches), len(batches))
    model.eval()
    quantizer_backend(next(model.parameters()).device)
    if weight_bits == activation_bits == 8:
        return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches), **preset,
                             advanced_parameters=nncf.AdvancedQuantizationParameters(**ranges))
    quantized = nncf.quantize(
        model, nncf.Dataset(batches), subset_size=len(batches), target_device=nncf.TargetDevice.NPU, **preset,
        # NPU's tables would quantize the pooled features at the pooling's input; keep them at its output.
        ignored_scope=nncf.IgnoredScope(types=["adaptive_avg_pool2d"]),
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            weights_quantization_params=QuantizationParameters(
                num_bits=4, mode=QuantizationScheme.SYMMETRIC, per_channel=True),
            # Activations calibrate at 8 bits, per tensor (their min/max range does not depend on the
            # width) and get theirs below: NPU's tables allow only 8- and 16-bit depthwise inputs.
            activations_quantization_params=QuantizationParameters(per_channel=False), **ranges))
    roles = quantizer_roles(quantized, batches[0][:1])
    eight = set(depthwise_layers(model)) if keep_depthwise else set()
    widths = {name: FIRST_LAST_BITS if role.edge or role.layer in eight
              else (weight_bits if role.kind == "weight" else activation_bits)
              for name, role in roles.items()}
    set_bit_widths(quantized, widths)
    _refit_weight_scales(quantized, roles, calibrated_bits=4)
    return quantized


@dataclass(frozen=True)
class QuantizerRole:
    """Where a quantizer sits: on a layer's weight or on an activation, and whether that is the
    network's first convolution or its classifier (kept at 8 bits)."""

    kind: str  # "weight" or "activation"
    layer: str | None  # the conv/linear whose weight it quantizes, or the first one its output feeds
    edge: bool  # on the first convolution or the classifier (its weight, or its input)


def named_quantizers(model: nn.Module) -> dict[str, BaseQuantizer]:
    """NNCF's quantizers by hook name (``pre_hooks.conv1/conv2d/0__1.0``), as ``get_config`` names
    them, sorted. A quantizer NNCF shares between hooks (one scale for both inputs of a residual
    add) is listed once, under the first of its names, so a reloaded model names it the same."""
    if not is_wrapped(model):
        return {}
    names: dict[int, tuple[BaseQuantizer, list[str]]] = {}
    for name, q in get_hook_storage(model).named_hooks(remove_duplicate=False):
        if isinstance(q, BaseQuantizer):
            names.setdefault(id(q), (q, []))[1].append(name)
    return dict(sorted((min(hooks), q) for q, hooks in names.values()))


@torch.no_grad()
def quantizer_roles(model: nn.Module, example: torch.Tensor) -> dict[str, QuantizerRole]:
    """Trace one forward of ``example`` to tell weight from activation quantizers and find the
    layers they serve. A weight quantizer receives the layer's weight parameter itself; an
    activation quantizer's output is the input of the layers that read it (matched by storage).
    The edges are the first convolution and the classifier named by the model's architecture
    description (:func:`surgery.architectures.architecture_of`)."""
    named = named_quantizers(model)
    layers = weight_layers(model)
    arch = architecture_of(model)
    edges = {arch.first_conv, arch.classifier}
    owner = {id(m.weight): n for n, m in layers.items()}
    seen: dict[str, tuple[str | None, torch.Tensor | None]] = {}  # quantizer -> (weight owner, output)
    readers: dict[int, list[str]] = {}  # data_ptr of a layer's input -> layers reading it
    alive: list[torch.Tensor] = []  # every traced tensor stays referenced: no storage is reused

    def on_quantizer(name):
        def hook(module, inputs, output):
            if isinstance(inputs[0], nn.Parameter):
                seen[name] = (owner.get(id(inputs[0])), None)
            else:
                seen[name] = (None, output)
                alive.append(output)
        return hook

    def on_layer(name):
        def hook(module, inputs):
            readers.setdefault(inputs[0].data_ptr(), []).append(name)
            alive.append(inputs[0])
        return hook

    handles = [q.register_forward_hook(on_quantizer(n)) for n, q in named.items()]
    handles += [m.register_forward_pre_hook(on_layer(n)) for n, m in layers.items()]
    was_training = model.training
    try:
        with forward_lock(model):
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    roles = {}
    for name in named:
        weight_of, output = seen.get(name, (None, None))
        if weight_of is not None:
            roles[name] = QuantizerRole("weight", weight_of, weight_of in edges)
        else:
            fed = readers.get(output.data_ptr(), []) if output is not None else []
            roles[name] = QuantizerRole("activation", fed[0] if fed else None, bool(edges.intersection(fed)))
    return roles


def weight_quantizers(model: nn.Module, example: torch.Tensor) -> dict[str, BaseQuantizer]:
    """Each quantized conv and linear layer's weight quantizer, by layer name; calling one on a
    weight tensor of its layer's shape gives the weights the forward uses (empty for FP32 models)."""
    named = named_quantizers(model)
    return {role.layer: named[name] for name, role in quantizer_roles(model, example).items()
            if role.kind == "weight" and role.layer is not None}


def bit_widths(model: nn.Module) -> dict[str, int]:
    """Every quantizer's bit width by hook name (empty for FP32 and sparse models)."""
    return {name: int(q.num_bits) for name, q in named_quantizers(model).items()}


def set_bit_widths(model: nn.Module, widths: Mapping[str, int]) -> None:
    """Give the named quantizers these bit widths: the buffer the forward reads, the levels derived
    from it, and the spec that ``get_config`` records (so a reload rebuilds the same widths)."""
    named = named_quantizers(model)
    unknown = sorted(set(widths) - set(named))
    if unknown:
        raise ValueError(f"no quantizers named {', '.join(unknown)}")
    for name, bits in widths.items():
        named[name].num_bits = int(bits)  # fills _num_bits and recomputes the levels
        named[name]._qspec.num_bits = int(bits)  # private, but it is what get_config serialises


def settle_bit_widths(model: nn.Module) -> dict[str, int]:
    """After ``restore`` and ``load_state_dict``: recompute every quantizer's levels from its loaded
    bit width and return the widths. NNCF's ``SymmetricQuantizer`` does this after loading a state
    dict, ``AsymmetricQuantizer`` does not (it would keep the levels of the config's width).
    Raises ``ValueError`` when the state dict's width disagrees with the one NNCF's config records."""
    for name, q in named_quantizers(model).items():
        if int(q.num_bits) != int(q._qspec.num_bits):
            raise ValueError(f"quantizer {name}: {q.num_bits} bits in the weights, "
                             f"{q._qspec.num_bits} in NNCF's config")
        q.num_bits = int(q.num_bits)
        if q.levels > 2 ** int(q.num_bits):
            raise ValueError(f"quantizer {name}: {q.levels} levels for {q.num_bits} bits")
    return bit_widths(model)


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable ranges of every quantizer (symmetric scales; asymmetric low and range), for an
    optimiser group of their own (NNCF 3.4 has no ``compression_lr_multiplier`` any more)."""
    return [p for q in quantizers(model) for p in q.parameters() if p.requires_grad and p.is_floating_point()]


@torch.no_grad()
def _refit_weight_scales(model: nn.Module, roles: dict[str, QuantizerRole], calibrated_bits: int) -> None:
    """Per-channel scales of the weight quantizers whose width is not ``calibrated_bits``, chosen
    among fractions of the calibrated scale to minimise the squared quantization error: at 2 or 3
    bits NNCF's max-abs range rounds most weights to zero."""
    named = named_quantizers(model)
    modules = dict(model.named_modules())
    for name, role in roles.items():
        q = named[name]
        if role.kind != "weight" or int(q.num_bits) == calibrated_bits or not isinstance(q, SymmetricQuantizer) \
                or q.is_using_log_scale_storage:
            continue
        weight = modules[role.layer].weight.detach()
        calibrated = q.scale.detach().clone()
        best, best_error = calibrated.clone(), None
        for fraction in torch.linspace(0.1, 1.0, 37):
            q.scale.data.copy_(calibrated * fraction)
            error = (q(weight) - weight).pow(2).flatten(1).sum(1)
            error = error.view_as(calibrated) if calibrated.numel() == len(error) else error.sum().view_as(calibrated)
            better = error < best_error if best_error is not None else torch.ones_like(error, dtype=torch.bool)
            best = torch.where(better, calibrated * fraction, best)
            best_error = error if best_error is None else torch.minimum(error, best_error)
        q.scale.data.copy_(best)


def _take_images(batches: Iterable[torch.Tensor], num_samples: int) -> Iterator[torch.Tensor]:
    seen = 0
    for batch in batches:
        if seen >= num_samples:
            return
        batch = batch[: num_samples - seen]
        seen += len(batch)
        yield batch


def quantizers(model: nn.Module) -> list[nn.Module]:
    """The NNCF fake-quantizer modules the model runs (empty for FP32 and sparse models)."""
    return [m for m in model.modules() if isinstance(m, BaseQuantizer)]


_BACKENDS: dict[str, str] = {}  # device type -> what runs the quantizers there, once decided


def quantizer_backend(device: torch.device | str) -> str:
    """Load NNCF's quantizer kernels for ``device`` now and say which run: its compiled extension or torch.

    NNCF compiles a C++ extension the first time a quantizer runs on a device type (the CUDA one
    needs the CUDA toolkit's ``nvcc``). On the CPU a failed compile falls back to NNCF's torch
    implementation of the same functions (``ReferenceQuantizedFunctions``); on CUDA NNCF 3.4 raises
    ``InstallationError`` instead, so here the CUDA path gets that same fallback, which gives
    the same values up to float rounding and is slower. Logged once per device type; returns
    ``"compiled extension"`` or ``"torch fallback"``.
    """
    kind = torch.device(device).type
    if kind not in _BACKENDS:
        namespace = _extensions.QuantizedFunctionsCUDA if kind == "cuda" else _extensions.QuantizedFunctionsCPU
        try:
            namespace.get("Quantize_forward")  # compiles or loads the extension, once per process
        except nncf.InstallationError as exc:
            logger.warning("NNCF could not build its CUDA extension (%s); using its torch fallback",
                           str(exc).splitlines()[0])
            namespace._loaded_namespace = ReferenceQuantizedFunctions  # private: NNCF has no switch for it
        fallback = getattr(namespace, "_loaded_namespace", None) is ReferenceQuantizedFunctions
        _BACKENDS[kind] = "torch fallback" if fallback else "compiled extension"
        logger.info("NNCF quantizers on %s run %s", kind, "NNCF's torch fallback (slower)" if fallback
                    else f"NNCF's compiled {kind.upper()} extension")
    return _BACKENDS[kind]


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's conv and linear layers by name: the ones whose weights compression quantizes or prunes."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def depthwise_layers(model: nn.Module) -> list[str]:
    """The names of the model's depthwise convolutions (one filter per input channel)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels]


def small_layers(model: nn.Module, below: int) -> list[str]:
    """The names of the model's conv and linear layers with fewer than ``below`` weights."""
    return [name for name, m in weight_layers(model).items() if m.weight.numel() < below]


def _masks_on(model: nn.Module, example_input: torch.Tensor, mode: nncf.PruneMode, dense: list[str]) -> None:
    """NNCF masks at ratio 0 on every conv and linear layer but the ``dense`` ones."""
    # NNCF names a module's op by its path with "/" for "."; a layer's weight is an input of that op.
    ignored = nncf.IgnoredScope(patterns=[f"^{re.escape(name.replace('.', '/'))}/" for name in dense]) if dense else None
    nncf.prune(model, mode=mode, ratio=0.0, ignored_scope=ignored, examples_inputs=example_input)


def start_magnitude_sparsity(model: nn.Module, example_input: torch.Tensor, target: float, ramp_updates: int,
                             per_layer: bool = False, dense: Iterable[str] = ()) -> ExponentialMagnitudePruningScheduler:
    """Attach magnitude masks (in place) at ratio 0 and return their ramp scheduler.

    Each ``scheduler.step()`` raises the sparsity along NNCF's exponential schedule, reaching
    ``target`` after ``ramp_updates`` steps; between steps the masked weights get exactly zero
    gradient, so fine-tuning heals the network around the pruned weights gradually.

    Global masks (NNCF's ``UNSTRUCTURED_MAGNITUDE_GLOBAL``) rank every weight by its magnitude
    relative to its tensor's norm, so layers end up at very different sparsities (on MobileNetV2,
    depthwise and projection layers are emptied); ``per_layer`` gives each layer the same sparsity
    (``UNSTRUCTURED_MAGNITUDE_LOCAL``). The conv and linear layers named in ``dense`` get no mask;
    the others are then pruned further, so that ``target`` holds over all conv and linear weights.
    """
    mode = nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_LOCAL if per_layer else SPARSITY_MODE
    dense = sorted(set(dense))
    sizes = {name: m.weight.numel() for name, m in weight_layers(model).items()}
    unknown = [name for name in dense if name not in sizes]
    if unknown:
        raise ValueError(f"no conv or linear layers named {', '.join(unknown)}")
    ratio = target * sum(sizes.values()) / (sum(sizes.values()) - sum(sizes[name] for name in dense))
    if ratio >= 1:
        raise ValueError(f"{target:.0%} sparsity cannot be reached with {len(dense)} layers left dense")
    _masks_on(model, example_input, mode, dense)
    return ExponentialMagnitudePruningScheduler(
        model, mode=mode, initial_ratio=0.0, target_ratio=ratio, target_epoch=max(ramp_updates, 1))


def bake_sparsity(model: nn.Module) -> nn.Module:
    """Multiply the masks into the weights and remove the hooks: zeros become real zeros. The model
    stays as trainable as it was (NNCF's strip freezes the weights it bakes)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    nncf.strip(model, do_copy=False, strip_format=nncf.StripFormat.IN_PLACE)
    for p in trainable:
        p.requires_grad_(True)
    return model


def _has_hooks(model: nn.Module) -> bool:
    """Whether the model's forward runs NNCF hooks (quantizers or unbaked masks). A baked sparse
    model keeps an empty hook container, which counts as none."""
    return is_wrapped(model) and not get_hook_storage(model).is_empty()


def compression_config(model: nn.Module) -> dict | None:
    """NNCF's JSON-serialisable description of where its modules sit; None for a plain model."""
    return nncf.torch.get_config(model) if _has_hooks(model) else None


def restore(model: nn.Module, config: dict) -> nn.Module:
    """Re-insert NNCF modules described by ``compression_config`` into a fresh, uncompressed model.

    Only NNCF's own module classes may be instantiated (NNCF's allow-list), so a tampered config
    cannot construct arbitrary objects.
    """
    return nncf.torch.load_from_config(model, config)


def weight_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in every conv and linear weight, and over all of them together."""
    per_layer, zeros, total = {}, 0, 0
    for name, module in weight_layers(model).items():
        w = module.weight.detach()
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return {"overall": zeros / max(total, 1), **per_layer}


# One lock for every NNCF-hooked forward in the process: NNCF 3.4's FunctionHookMode patches each
# module's ``_call_impl`` on entry and pops it on exit, so two threads running one INT8 model at
# once corrupt each other (seen here: logits off by 0.5, ``KeyError: '_call_impl'``). Reentrant, so
# a forward hook that itself runs the model cannot deadlock.
_NNCF_FORWARD_LOCK = threading.RLock()


def forward_lock(model: nn.Module) -> ContextManager:
    """Hold around a forward pass of ``model`` that may run concurrently with other threads.

    A no-op for models whose forward runs no NNCF hooks (FP32, baked sparse: NNCF then skips its
    hook mode); for INT8 models it serialises the forward passes (backward passes need no lock).
    Every caller that may race must take it.

    Example:
        >>> with forward_lock(model):
        ...     logits = model(x)
    """
    return _NNCF_FORWARD_LOCK if _has_hooks(model) else nullcontext()


def untraced() -> ContextManager:
    """Hold around work that a forward hook of an NNCF model does on the side (another model's
    forward, a quantizer called on a weight): NNCF names ops by their order within the forward,
    so untraced ops would otherwise be taken for the model's own and get its hooks."""
    return disable_function_hook_mode()


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized tensor, bit for bit. Backward: the gradient reaches the input unclipped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        # A clone, not the input itself: an in-place ReLU downstream may overwrite the output.
        return quantized.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


@contextmanager
def straight_through(model: nn.Module) -> Iterator[int]:
    """Give the model's fake-quantizers a straight-through backward while the block runs.

    NNCF's quantizer backward (``QuantizeSymmetric``/``QuantizeAsymmetric`` in
    ``nncf.torch.quantization.quantize_functions``) already treats rounding as the identity but
    multiplies the gradient by the mask of inputs *inside* the calibrated range
    ``[input_low, input_low + input_range]``: saturated inputs get exactly zero gradient. Here the
    gradient passes everywhere (Bengio et al. 2013, "Estimating or Propagating Gradients Through
    Stochastic Neurons"); the forward values stay the quantized ones, bit for bit. Scale and
    range parameters get no gradient, so this is for analysis (activation maximisation), never QAT.

    Implemented as forward hooks on the quantizer modules of this ``model`` only, acting only on
    forward passes run by the calling thread: other threads and other models keep the true
    gradient. Yields the number of quantizers hooked (0 for FP32 and sparse models). Limits: a
    model run by the same thread inside the block for another purpose gets the estimate too.

    Example:
        >>> with straight_through(int8_model):
        ...     grad, = torch.autograd.grad(int8_model(x)[:, 3].sum(), x)
    """
    thread = threading.get_ident()

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        # Weight quantizers receive the parameter itself; an input gradient never goes through
        # their backward (only through the quantized weights' values), so they are left alone.
        if threading.get_ident() != thread or isinstance(inputs[0], nn.Parameter) \
                or not isinstance(output, torch.Tensor):
            return None
        return _StraightThrough.apply(inputs[0], output)

    handles = [q.register_forward_hook(hook) for q in quantizers(model)]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


# -- Quantizer ranges, for the study's layer diagnostics (read-only) -----------------------------

@dataclass(frozen=True)
class QuantizerRange:
    """One NNCF fake-quantizer: where it sits, its bit width and its range ``[low, high]``.

    ``name`` is NNCF's hook name, e.g. ``post_hooks.layer2/0/relu/relu_/0__0.0`` (an activation:
    the output of that op) or ``pre_hooks.layer2/0/conv1/conv2d/0__1.0`` (port 1 of a conv:
    its weight). ``low``/``high`` broadcast against the quantized tensor (per channel for
    weights); inputs outside them are clipped to them.
    """

    name: str
    module: nn.Module
    bits: int
    low: torch.Tensor
    high: torch.Tensor
    weights: bool

    @property
    def layer(self) -> str:
        """The model's module path of the op, dotted (``layer2.0.relu``), ``""`` for the input."""
        path = self.name.split(".", 1)[1].rsplit("/", 2)[0]
        return path.strip("/").replace("/", ".")


def quantizer_ranges(model: nn.Module) -> list[QuantizerRange]:
    """Every quantizer of a quantized model with its bit width and range; empty for other models.

    Example:
        >>> [(q.layer, q.bits) for q in quantizer_ranges(int4) if not q.weights][:2]
        [('', 8), ('relu', 8)]
    """
    if not is_wrapped(model):
        return []
    ranges = []
    for name, module in get_hook_storage(model).named_hooks():
        if not isinstance(module, BaseQuantizer):
            continue
        with torch.no_grad():
            low, high = module.get_input_low_input_high()
        port = int(name.rsplit("__", 1)[1].split(".")[0])
        ranges.append(QuantizerRange(name, module, int(module.num_bits), low.detach().clone(), high.detach().clone(),
                                     weights=name.startswith("pre_hooks.") and port >= 1))
    return ranges


@contextmanager
def clipping_counts(model: nn.Module) -> Iterator[dict[str, list[int]]]:
    """Count, while the block runs, the activation values each quantizer clips to its range.

    Yields ``{quantizer name: [clipped, total]}``, updated by every forward pass of ``model`` in
    the block (weight quantizers are left out). Empty for models without quantizers.

    Example:
        >>> with clipping_counts(int8) as counts:
        ...     int8(images)
        >>> {name: c / t for name, (c, t) in counts.items()}
    """
    counts: dict[str, list[int]] = {}
    handles = []
    for q in quantizer_ranges(model):
        if q.weights:
            continue
        counts[q.name] = [0, 0]

        def hook(module: nn.Module, inputs: tuple, q: QuantizerRange = q) -> None:
            x = inputs[0].detach()
            low, high = q.low.to(x.device), q.high.to(x.device)
            counts[q.name][0] += int(((x < low) | (x > high)).sum())
            counts[q.name][1] += x.numel()

        handles.append(q.module.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
