"""Synthetic images drawn from a trained network's BatchNorm statistics: data for fitting and for
judging compressed variants where the training data is not at hand.

ZeroQ (Cai et al. 2020, "ZeroQ: A Novel Zero Shot Quantization Framework") optimises images from
noise until the inputs of every BatchNorm layer of the FP32 network have, over the batch, the
per-channel mean and variance that layer stores from training. Those running statistics are the
only trace of ImageNet a pretrained network carries, so such images stand in for its data where
the photos on the machine (a few dozen, unlike ImageNet) do not. Here they add rows to the
layer-wise refit of sparse variants (:mod:`training.reconstruction`), and a set drawn with another
seed is a held-out judge of recipes (``bench/bench_recipes.py``).

Pixels are ``sigmoid(z)`` in [0, 1] (the network normalises its own input), ``z`` optimised with
Adam at a cosine-annealed step. Generation is deterministic for a seed and costs about 4 minutes
per 32 images at 160 px and 200 steps on 2 CPU cores for MobileNetV2, so the images are cached
(safetensors, keyed by the FP32 weights and the settings).

Example:
    >>> images = batchnorm_images(fp32, 64, size=160, steps=200, seed=0)   # [64, 3, 160, 160]
    >>> images = cached_batchnorm_images(fp32, 64, size=160, cache=Path("zoo/.synthetic"))
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)

STEPS = 200  # Adam steps per batch: the statistics loss flattens by then (MobileNetV2, 160 px)
LR = 0.1
BATCH = 32  # images optimised together: the statistics are matched over a batch


def statistics_loss(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Sum over the BatchNorm layers of ``model`` of ``|mean - running_mean| + |var - running_var|``
    (L2 norms over channels) of their inputs on ``images``: ZeroQ's objective."""
    terms: list[torch.Tensor] = []

    def hook(module: nn.modules.batchnorm._BatchNorm, inputs: tuple[torch.Tensor, ...], _output) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        terms.append((x.mean(dims) - module.running_mean).norm()
                     + (x.var(dims, unbiased=False) - module.running_var).norm())

    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise ValueError("the model has no BatchNorm layer: there are no statistics to draw images from")
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(terms).sum()


def batchnorm_images(model: nn.Module, n: int, size: int, steps: int = STEPS, seed: int = 0,
                     batch: int = BATCH) -> torch.Tensor:
    """``n`` images ``[n, 3, size, size]`` in [0, 1] whose BatchNorm input statistics in ``model``
    (in eval mode, unchanged) match its running ones, optimised ``steps`` Adam steps per ``batch``."""
    if n < 1 or size < 1 or steps < 1:
        raise ValueError(f"n, size and steps must be positive, got {n}, {size}, {steps}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    out = []
    try:
        with tqdm(total=steps * -(-n // batch), desc=f"synthetic images ({n})", leave=False) as bar:
            for start in range(0, n, batch):
                z = torch.randn(min(batch, n - start), 3, size, size, generator=generator).to(device)
                z.requires_grad_(True)
                optimiser = torch.optim.Adam([z], lr=LR)
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
                for _ in range(steps):
                    loss = statistics_loss(model, torch.sigmoid(z))
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.3g}")
                out.append(torch.sigmoid(z).detach())
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return torch.cat(out)


def _key(model: nn.Module, n: int, size: int, steps: int, seed: int, batch: int) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(f"{n} {size} {steps} {seed} {batch} {LR}".encode())
    return digest.hexdigest()[:16]


def cached_batchnorm_images(model: nn.Module, n: int, size: int, cache: Path, steps: int = STEPS,
                            seed: int = 0, batch: int = BATCH) -> torch.Tensor:
    """:func:`batchnorm_images`, read from ``cache`` when these settings were generated there for
    these weights, else generated and written there."""
    path = cache / f"batchnorm-images-{_key(model, n, size, steps, seed, batch)}.safetensors"
    if path.is_file():
        try:
            return safetensors.torch.load_file(path)["images"]
        except Exception as exc:  # a truncated or foreign file: generate again, overwrite it
            logger.warning("unreadable synthetic-image cache %s (%s): generating the images again", path, exc)
    logger.info("generating %d synthetic images at %d px (%d steps a batch of %d, seed %d)", n, size, steps,
                batch, seed)
    images = batchnorm_images(model, n, size, steps, seed, batch)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")  # processes of one run may write the same file
    safetensors.torch.save_file({"images": images.cpu().contiguous()}, partial)
    partial.replace(path)
    return images
