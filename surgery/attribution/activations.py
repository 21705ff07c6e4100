"""The one place where forward hooks are attached: capture a layer's output during a forward pass.

Several threads may share one model (the Gradio app serves concurrent requests), and module
hooks are visible to every thread. So each capture is a per-call object whose hook records only
the forward passes run by the thread that opened it, and whose handle is removed on exit; nothing
is stored on the model. Gradients are then taken with ``torch.autograd.grad`` with respect to the
captured tensor, never read from ``.grad`` fields.

Example:
    >>> with LayerCapture(model, "layer4") as capture:
    ...     logits = model(x)
    >>> capture.output.shape
    torch.Size([8, 512, 4, 4])
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from surgery.architectures import architecture_of


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    """``(name, module)`` for a dotted submodule name, a submodule, or None (the model's GradCAM
    layer, from its architecture description: :func:`surgery.architectures.architecture_of`)."""
    if layer is None:
        layer = architecture_of(model).gradcam_layer
    if isinstance(layer, str):
        try:
            return layer, model.get_submodule(layer)
        except AttributeError:
            stages = ", ".join(repr(s) for s in _stages(model))
            raise ValueError(f"model {type(model).__name__} has no submodule {layer!r}"
                             f"{f' (its stages: {stages})' if stages else ''}") from None
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
    raise TypeError(f"layer must be a module name, a module or None, got {type(layer).__name__}")


def _stages(model: nn.Module) -> tuple[str, ...]:
    try:
        return architecture_of(model).stages
    except ValueError:
        return ()


class LayerCapture:
    """Context manager recording the output of ``layer`` in forwards run by the opening thread.

    The hook hands the next module a clone of the output, so that an in-place operation
    downstream (torchvision's ``ReLU(inplace=True)``) cannot rewrite the captured node: gradients
    taken with respect to :attr:`output` are those of the layer's output as computed.
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None) -> None:
        self.name, self.module = resolve_layer(model, layer)
        self.outputs: list[torch.Tensor] = []
        self._thread: int | None = None
        self._handle = None

    def __enter__(self) -> LayerCapture:
        self._thread = threading.get_ident()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, inputs: tuple, output) -> torch.Tensor | None:
        if threading.get_ident() != self._thread:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {self.name!r} returns {type(output).__name__}, not a tensor")
        self.outputs.append(output)
        return output.clone()

    @property
    def output(self) -> torch.Tensor:
        """The layer's output in the one forward pass run inside the block."""
        if len(self.outputs) != 1:
            raise ValueError(f"layer {self.name!r} ran {len(self.outputs)} times in one forward pass; "
                             "choose a module that runs exactly once (torchvision blocks reuse their ReLU)")
        return self.outputs[0]

    def reset(self) -> None:
        """Forget earlier captures (one capture serves many steps of an optimisation)."""
        self.outputs.clear()
