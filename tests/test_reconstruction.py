"""Layer-wise reconstruction (training/reconstruction.py): a pruned layer's kept weights are the
least-squares fit to FP32's outputs given the pruned network's own inputs, the masks stay, and a
layer that lost nothing keeps its weights; a quantized layer's weights are rounded onto their grid
with GPTQ's error compensation, which beats rounding to the nearest level on the layer's output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from training.reconstruction import DAMPING, _round_with_compensation, reconstruct_pruned_layers


def _pruned(layer: nn.Module, fraction: float) -> nn.Module:
    pruned = copy.deepcopy(layer)
    with torch.no_grad():
        w = pruned.weight
        w.mul_((w.abs() > w.abs().flatten().kthvalue(int(fraction * w.numel())).values).float())
    return pruned


@pytest.mark.parametrize("damping", [DAMPING, 1.0])
def test_each_row_is_the_damped_least_squares_fit_on_its_support(damping):
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(12, 5))
    x = torch.randn(400, 12) @ torch.randn(12, 12)  # correlated inputs: the refit must use them
    student = nn.Sequential(_pruned(fp32[0], 0.5))
    kept = student[0].weight != 0
    reconstruct_pruned_layers(student, fp32, x, damping=damping)
    h, target = (x.T @ x).double(), (x @ fp32[0].weight.T).double()
    for row in range(5):
        s = kept[row]
        lam = damping * h.diagonal().mean()
        a = h[s][:, s] + lam * torch.eye(int(s.sum()), dtype=h.dtype)
        b = x[:, s].double().T @ target[:, row] + lam * fp32[0].weight[row, s].double()
        expected = torch.linalg.solve(a, b)
        assert torch.allclose(student[0].weight[row, s].double(), expected, rtol=1e-4, atol=1e-6), row
    assert torch.equal(student[0].weight != 0, kept), "the masks stay: zeros stay zeros"
    with torch.no_grad():
        before = (x @ _pruned(fp32[0], 0.5).weight.T - x @ fp32[0].weight.T).norm()
        after = (x @ student[0].weight.T - x @ fp32[0].weight.T).norm()
    assert after < 0.9 * before, (float(after), float(before))


def test_a_larger_damping_keeps_the_kept_weights_nearer_fp32s():
    """The damping is a ridge towards FP32's weights: the larger, the less the refit moves them
    (what keeps it from learning calibration images unlike the training data)."""
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(12, 5))
    x = torch.randn(400, 12) @ torch.randn(12, 12)
    masked = _pruned(fp32[0], 0.5).weight
    moved = []
    for damping in (0.01, 1.0, 100.0):
        student = nn.Sequential(_pruned(fp32[0], 0.5))
        reconstruct_pruned_layers(student, fp32, x, damping=damping)
        moved.append(float((student[0].weight - masked).norm() / masked.norm()))
    assert moved[0] > moved[1] > moved[2] and moved[2] < 0.05, moved


def test_a_network_that_lost_nothing_keeps_its_weights_and_convolutions_refit_through_depth():
    torch.manual_seed(1)
    fp32 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.ReLU(), nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    images = torch.randn(64, 3, 6, 6)
    same = copy.deepcopy(fp32)
    errors = reconstruct_pruned_layers(same, fp32, images)
    for a, b in zip(same.parameters(), fp32.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert max(errors.values()) < 1e-4
    pruned = copy.deepcopy(fp32)
    for i in (0, 2, 4, 7):
        pruned[i] = _pruned(fp32[i], 0.5)
    refitted = copy.deepcopy(pruned)
    reconstruct_pruned_layers(refitted, fp32, images)
    held_out = torch.randn(256, 3, 6, 6)
    with torch.no_grad():
        target = fp32(held_out)
        gap = {name: float((m(held_out) - target).norm() / target.norm()) for name, m in
               (("one-shot", pruned), ("refitted", refitted))}
    assert gap["refitted"] < 0.7 * gap["one-shot"], gap
    for i in (0, 2, 4, 7):
        assert torch.equal(refitted[i].weight == 0, pruned[i].weight == 0)


def test_rounding_with_error_compensation_stays_on_the_grid_and_beats_rounding_to_nearest():
    torch.manual_seed(2)
    x = torch.randn(2000, 16) @ torch.randn(16, 16)  # correlated inputs: later columns can absorb errors
    w = torch.randn(6, 16)

    def grid(v: torch.Tensor) -> torch.Tensor:  # levels 0.5 apart, as a coarse weight quantizer's
        return torch.round(v * 2) / 2

    rounded = _round_with_compensation(w, (x.T @ x).double()[None], DAMPING, grid)
    assert torch.equal(grid(rounded), rounded), "every weight on the grid"
    error = {name: float((x @ (v - w).T).norm()) for name, v in (("compensated", rounded), ("nearest", grid(w)))}
    assert error["compensated"] < 0.7 * error["nearest"], error
