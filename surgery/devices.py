"""Where models and tensors live: the one place that turns ``--device auto|cpu|cuda|cuda:N`` into a device.

Every entry point (``python app.py``, ``python -m training``, ``python -m space.report``, the
benchmarks) takes ``--device`` and calls :func:`resolve_device`; without the flag the environment
variable ``SURGERY_DEVICE`` decides, else ``auto``: the first CUDA GPU when PyTorch sees one, the
CPU otherwise. Asking for CUDA on a machine without it is a clear error, not a traceback later.

:func:`move` puts a loaded model on its device and, for a model with NNCF fake-quantizers, makes
sure NNCF's kernels for that device are ready (see :func:`surgery.compression.quantizer_backend`),
logging whether NNCF's compiled extension or its torch fallback runs them.

Analysis runs in float32 on every device: no autocast, and TF32 (reduced-precision matmuls and
convolutions on Ampere and later GPUs) switched off by :func:`faithful`, because attribution maps
are compared pixel by pixel between variants and an INT8 model's rounding boundaries shift under
lower precision. Training keeps its own recipe's autocast (``training/loop.py``).

Example:
    >>> from surgery.devices import resolve_device, move
    >>> device = resolve_device("auto")            # cuda:0 on a GPU machine, else cpu
    >>> model = move(model, device)
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

ENV = "SURGERY_DEVICE"
CHOICES = "auto, cpu, cuda, cuda:N"
DeviceSpec = str | torch.device | None


class DeviceError(ValueError):
    """A device that cannot be used here (unknown name, or CUDA on a machine without it)."""


def resolve_device(spec: DeviceSpec = None) -> torch.device:
    """The device ``spec`` names: ``auto`` (or None: ``$SURGERY_DEVICE``, else auto), cpu, cuda, cuda:N.

    ``cuda`` means the current CUDA device (``cuda:0`` unless set otherwise). Raises
    :class:`DeviceError` for an unknown name, for CUDA when PyTorch sees no GPU (naming what PyTorch
    was built with), and for a GPU index past the last GPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if spec is None:
        spec = os.environ.get(ENV) or "auto"
    if isinstance(spec, str):
        spec = spec.strip().lower()
        if spec == "auto":
            return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise DeviceError(f"unknown device {spec!r}; choose from {CHOICES}") from None
    else:
        device = torch.device(spec)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"device {str(device)!r} is not supported; choose from {CHOICES}")
    if not torch.cuda.is_available():
        built = f"PyTorch {torch.__version__} built with CUDA {torch.version.cuda}" if torch.version.cuda \
            else f"PyTorch {torch.__version__} built without CUDA"
        raise DeviceError(f"device {str(device)!r} was asked for, but no CUDA GPU is available here "
                          f"({built}); use --device cpu or auto")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise DeviceError(f"device {str(device)!r} was asked for, but this machine has {count} CUDA "
                          f"GPU(s): cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """A line for the log: the device and, for a GPU, its name and memory."""
    if device.type != "cuda":
        return f"{device} ({torch.get_num_threads()} threads)"
    props = torch.cuda.get_device_properties(device)
    return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"


def faithful(device: torch.device) -> None:
    """Keep float32 as float32 on ``device``: no TF32 in cuDNN convolutions or matmuls.

    PyTorch lets cuDNN use TF32 (10-bit mantissa) for convolutions by default on Ampere and later;
    that shifts GradCAM maps and INT8 rounding against the CPU's answers. A process-wide setting
    of PyTorch, so it is set where a program picks its device, never inside a library call.
    """
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def move(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device`` (in place, returned); for an NNCF model, its quantizer kernels readied."""
    model.to(device)
    from surgery import compression  # NNCF is imported with the checkpoint loader anyway

    if compression.quantizers(model):
        compression.quantizer_backend(device)
    return model
