"""Image parametrization of Lucid/Lucent (Olah, Mordvintsev and Schubert 2017, "Feature
Visualization", Distill): a Fourier spectrum scaled by 1/f, colours decorrelated, a sigmoid.

Optimising pixels directly lets high frequencies dominate (the gradient of a CNN is mostly high
frequency); a spectrum whose coefficients are scaled by 1/frequency makes every frequency about
equally easy to change, which Olah et al. found to give natural-looking images. The colour
transform is Lucid's square root of the ImageNet colour covariance, so the optimiser steps
along decorrelated colour axes.

Example:
    >>> image = FourierImage.random(4, 64, seeds=[0, 1, 2, 3])
    >>> image().shape          # [4, 3, 64, 64] in (0, 1), differentiable w.r.t. image.spectrum
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Lucid's ``color_correlation_svd_sqrt``, normalised to a largest column norm of 1.
_COLOR_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                                [0.27, 0.00, -0.05],
                                [0.27, -0.09, 0.03]])
COLOR_CORRELATION = _COLOR_SVD_SQRT / _COLOR_SVD_SQRT.norm(dim=0).max()
_LUCID_MAGIC = 4.0  # Lucid divides the inverse FFT by 4: less saturated starting images
_INIT_SD = 0.01


def spectrum_scale(height: int, width: int, decay_power: float = 1.0) -> torch.Tensor:
    """``1 / max(f, 1/max(h, w)) ** decay_power`` for the frequencies of ``rfft2`` ``[h, w//2+1]``."""
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    freqs = (fx * fx + fy * fy).sqrt()
    return 1.0 / freqs.clamp_min(1.0 / max(height, width)) ** decay_power


class FourierImage:
    """A batch of images ``[B, 3, H, W]`` parametrized by a scaled spectrum (the leaf to optimise)."""

    def __init__(self, spectrum: torch.Tensor, height: int, width: int, decorrelate: bool = True) -> None:
        self.spectrum = spectrum.requires_grad_(True)
        self.size = (height, width)
        self.decorrelate = decorrelate
        self._scale = spectrum_scale(height, width).to(spectrum.device)[None, None, :, :, None]

    @classmethod
    def random(cls, batch: int, size: int | tuple[int, int], seeds: Sequence[int], *, decorrelate: bool = True,
               device: torch.device | str = "cpu") -> FourierImage:
        """Small random spectra, image ``i`` drawn from ``seeds[i]`` alone (same seed, same start)."""
        height, width = (size, size) if isinstance(size, int) else size
        if len(seeds) != batch:
            raise ValueError(f"need one seed per image: {batch} images, {len(seeds)} seeds")
        shape = (3, height, width // 2 + 1, 2)  # real and imaginary parts
        spectra = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) * _INIT_SD for s in seeds]
        return cls(torch.stack(spectra).to(device), height, width, decorrelate)

    def __call__(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum * self._scale)
        image = torch.fft.irfftn(spectrum, s=self.size, norm="ortho") / _LUCID_MAGIC
        if self.decorrelate:
            image = torch.einsum("bchw,dc->bdhw", image, COLOR_CORRELATION.to(image.device))
        return torch.sigmoid(image)
