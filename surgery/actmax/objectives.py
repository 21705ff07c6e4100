"""What activation maximisation maximises, one value per image (Lucent ``objectives``).

- ``channel``: the mean of channel ``c`` of the layer's output over all positions;
- ``neuron``: channel ``c`` at the centre position of the layer's output;
- ``logit``: the model's output (pre-softmax) for class ``c``; the layer is not used.
"""

from __future__ import annotations

import torch

OBJECTIVES = ("channel", "neuron", "logit")


def objective_values(objective: str, output: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Image ``i``'s objective for ``channels[i]``; ``output`` is the layer's output or the logits."""
    rows = torch.arange(len(channels), device=output.device)
    if objective == "logit":
        return output[rows, channels]
    if output.dim() != 4:
        raise ValueError(f"the {objective!r} objective needs a layer output [N, C, h, w], got {list(output.shape)}")
    if objective == "channel":
        return output[rows, channels].mean(dim=(1, 2))
    if objective == "neuron":
        h, w = output.shape[-2:]
        return output[rows, channels, h // 2, w // 2]
    raise ValueError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
