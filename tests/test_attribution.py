"""Attribution maps: agreement with Captum on FP32, INT8 and sparse models, the fused pass, threads."""

from __future__ import annotations

import threading

import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam, Saliency

from surgery import compression, explain, gradcam, load_variant, normalize_maps, saliency

VARIANTS = ("fp32", "int8", "sparse90")


@pytest.fixture(scope="module")
def models(tiny_zoo):
    return {v: load_variant(tiny_zoo / v).model for v in VARIANTS}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _captum_gradcam(model, x, target, layer):
    attr = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    return normalize_maps(LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), "bilinear")[:, 0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcam_matches_captum(models, images, variant):
    model = models[variant]
    if variant == "int8":
        assert compression.quantizers(model), "the INT8 variant must run NNCF quantizers"
    predicted = model(images).argmax(1)
    ours = gradcam(model, images)
    assert ours.shape == (4, 64, 64)
    assert (ours.amax(dim=(1, 2)) == 1).all() and ours.min() >= 0
    assert (ours - _captum_gradcam(model, images, predicted, model.layer4)).abs().max() <= 1e-5
    # A named, non-default layer and an explicit target per image.
    target = torch.tensor([0, 3, 5, 9])
    ours = gradcam(model, images, target=target, layer="layer3")
    assert (ours - _captum_gradcam(model, images, target, model.layer3)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_saliency_matches_captum(models, images, variant):
    model = models[variant]
    target = torch.tensor([1, 2, 3, 4])
    reference = normalize_maps(Saliency(model).attribute(images.clone().requires_grad_(), target=target).amax(1))
    assert (saliency(model, images, target) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ("fp32", "int8"))
def test_explain_equals_separate_calls(models, images, variant):
    model = models[variant]
    e = explain(model, images)
    assert torch.equal(e.target, model(images).argmax(1))
    assert torch.allclose(e.probabilities.sum(1), torch.ones(4))
    assert torch.equal(e.gradcam, gradcam(model, images))
    assert torch.equal(e.saliency, saliency(model, images))
    assert e.layer == "layer4"


def test_smoothgrad_and_integrated_gradients(models, images):
    model = models["fp32"]
    smooth = saliency(model, images, method="smoothgrad", samples=4, seed=1)
    assert torch.equal(smooth, saliency(model, images, method="smoothgrad", samples=4, seed=1))
    assert not torch.equal(smooth, saliency(model, images, method="smoothgrad", samples=4, seed=2))
    assert not torch.equal(smooth, saliency(model, images))
    ig = saliency(model, images, method="integrated_gradients", steps=8)
    for maps in (smooth, ig):
        assert maps.shape == (4, 64, 64) and maps.min() >= 0 and (maps.amax(dim=(1, 2)) == 1).all()


@pytest.mark.parametrize("variant", ("fp32", "int8"))
def test_concurrent_explain_equals_serial(models, variant):
    """Two threads explaining different images on one shared model (as the app does)."""
    model = models[variant]
    batches = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    serial = [explain(model, b) for b in batches]
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        start.wait()
        try:
            results[i] = [explain(model, batches[i]) for _ in range(4)]
        except Exception as exc:  # re-raised below: a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in (0, 1):
        assert len(results[i]) == 4
        for e in results[i]:
            assert torch.equal(e.logits, serial[i].logits)
            assert torch.equal(e.gradcam, serial[i].gradcam)
            assert torch.equal(e.saliency, serial[i].saliency)
    assert not model.layer4._forward_hooks, "hooks must not outlive the call"


def test_bad_inputs_raise_clear_errors(models, images):
    model = models["fp32"]
    with pytest.raises(ValueError, match="no submodule 'layer9'"):
        gradcam(model, images, layer="layer9")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        gradcam(model, images[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        explain(model, images * 4 - 2)
    with pytest.raises(ValueError, match="out of range for 10 classes"):
        explain(model, images, target=10)
    with pytest.raises(ValueError, match="unknown saliency method"):
        saliency(model, images, method="deconv")
    with pytest.raises(ValueError, match="ran 2 times"):
        gradcam(model, images, layer="layer4.1.relu")
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            explain(model, images)
    finally:
        model.eval()
