"""What every attribution method shares: input checks, targets, one forward+backward, normalisation.

A model's forward and backward here never touch the model's own state: gradients come from
``torch.autograd.grad`` with respect to the input and the captured layer (no ``.grad`` fields,
no ``zero_grad``), the model stays in eval mode, and forwards of NNCF models hold
:func:`surgery.compression.forward_lock`, so concurrent calls on one shared model are safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from surgery import compression
from surgery.attribution.activations import LayerCapture

Target = int | Sequence[int] | torch.Tensor | None


def check_model(model: nn.Module) -> torch.device:
    """The model's device; refuses a model in training mode (BatchNorm would update its statistics)."""
    if model.training:
        raise ValueError(f"{type(model).__name__} is in training mode; attribution needs eval mode "
                         "(load_variant returns it so; call model.eval())")
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_images(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float batch ``[N, 3, H, W]`` in [0, 1] on ``device``, detached from any caller graph."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a tensor [N, 3, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W], got {list(x.shape)} "
                         "(use x.unsqueeze(0) for a single image)")
    if not x.is_floating_point():
        raise TypeError(f"images must be float in [0, 1], got dtype {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"images must lie in [0, 1] (models normalise inside), got range "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x.detach().to(device)


def resolve_target(target: Target, logits: torch.Tensor) -> torch.Tensor:
    """Class index per image: the prediction for None, an int for all, or one index per image."""
    n, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point() or t.dim() > 1:
        raise ValueError(f"target must be an int or {n} ints, got {target!r}")
    t = t.long().expand(n) if t.dim() == 0 else t.long()
    if len(t) != n:
        raise ValueError(f"target has {len(t)} entries for {n} images")
    if t.numel() and (t.min() < 0 or t.max() >= classes):
        raise ValueError(f"target {t.tolist()} out of range for {classes} classes")
    return t


@dataclass(frozen=True)
class Pass:
    """One forward and one backward: logits, targets and the gradients that were asked for."""

    logits: torch.Tensor  # [N, classes], detached
    target: torch.Tensor  # [N]
    activations: torch.Tensor | None  # captured layer output [N, C, h, w], detached
    layer_grad: torch.Tensor | None  # d score / d activations
    input_grad: torch.Tensor | None  # d score / d x, [N, 3, H, W]
    layer: str | None


def forward_backward(model: nn.Module, x: torch.Tensor, target: Target, *, layer: str | nn.Module | None = None,
                     capture_layer: bool = True, input_grad: bool = True) -> Pass:
    """Run ``model`` once on ``x`` and backpropagate the target logits once.

    Each image's score is its target logit; in eval mode the images of a batch are independent,
    so the gradient of the sum is every image's own gradient. The backward stops where it can:
    without ``input_grad`` it only reaches the captured layer (GradCAM's cost).
    """
    # The input always joins the graph, so the layer is reachable even in a model with frozen
    # weights; autograd.grad only walks the part of the graph that ``wrt`` needs.
    x = x.detach().requires_grad_(True)
    capture = LayerCapture(model, layer) if capture_layer else None
    with torch.enable_grad():
        with capture or nullcontext(), compression.forward_lock(model):
            logits = model(x)
        target_t = resolve_target(target, logits)
        score = logits.gather(1, target_t[:, None]).sum()
        wrt = ([capture.output] if capture else []) + ([x] if input_grad else [])
        grads = list(torch.autograd.grad(score, wrt))
    return Pass(
        logits=logits.detach(),
        target=target_t,
        activations=capture.output.detach() if capture else None,
        layer_grad=grads.pop(0) if capture else None,
        input_grad=grads.pop(0) if input_grad else None,
        layer=capture.name if capture else None,
    )


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map ``[N, H, W]`` by its own maximum, into [0, 1]; an all-zero map stays zero.

    Maps are non-negative (ReLU'd GradCAM, absolute gradients), so dividing by the maximum keeps
    0 meaning "no evidence" and 1 the strongest pixel of that image.
    Maps of different images or models are then comparable in rank, not in absolute scale.
    """
    peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(maps.dtype).tiny)
    return maps / peak[:, None, None]
