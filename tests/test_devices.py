"""Devices: ``--device`` resolution, and every tensor of the Space's requests on the requested device.

The plumbing test records, during an Explain, a Features and a Representations request, the device
and dtype of every tensor entering or leaving any module of the models (forward hooks on all of
them), of every tensor saved for the backward pass (what gradients are computed from) and of the
models' parameters and buffers. It runs on the CPU here and on ``cuda`` where the test machine has
a GPU; analysis stays float32 (no autocast) on both.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from space.session import Session
from space.zoo_source import SourceConfig, resolve
from surgery import compression
from surgery.devices import DeviceError, move, resolve_device
from surgery.images import load_image

from ci import compiler_missing, require

FAMILY = "resnet18-shapes"
NO_GPU = "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU))]


def test_cpu_and_auto_resolve(monkeypatch):
    monkeypatch.delenv("SURGERY_DEVICE", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    monkeypatch.setenv("SURGERY_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "mps", ""])
def test_unknown_device_is_one_clear_error(spec):
    with pytest.raises(DeviceError, match="choose from auto, cpu, cuda, cuda:N"):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_says_so(spec):
    with pytest.raises(DeviceError, match="no CUDA GPU is available here.*use --device cpu or auto"):
        resolve_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_gpu_index_past_the_last_gpu_says_how_many():
    with pytest.raises(DeviceError, match="CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_training_and_the_app_reject_a_missing_gpu_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from space.app import create_app
    from training.cli import main as training_main

    assert training_main(["fp32", "--family", FAMILY, "--out", str(tmp_path / "fp32"), "--device", "cuda"]) == 2
    assert not (tmp_path / "fp32").exists()
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        create_app(["--zoo", str(tmp_path), "--source", "local", "--device", "cuda"])


class Recorder:
    """Devices and dtypes of the tensors the models see: module inputs/outputs, tensors saved for backward."""

    def __init__(self) -> None:
        self.seen: Counter = Counter()

    def add(self, value, where: str) -> None:
        if isinstance(value, torch.Tensor):
            self.seen[(where, str(value.device), str(value.dtype) if value.is_floating_point() else "int")] += 1
        elif isinstance(value, (tuple, list)):
            for v in value:
                self.add(v, where)
        elif isinstance(value, dict):
            for v in value.values():
                self.add(v, where)

    @contextmanager
    def watching(self, models: list[torch.nn.Module]):
        def forward(module: torch.nn.Module, inputs: tuple, output) -> None:
            self.add(inputs, "forward in")
            self.add(output, "forward out")

        handles = [m.register_forward_hook(forward) for model in models for m in model.modules()]

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.add(t, "saved for backward")
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()
        for model in models:
            for p in (*model.parameters(), *model.buffers()):
                self.add(p, "parameter or buffer")

    def places(self, where: str) -> set[tuple[str, str]]:
        return {(device, dtype) for (w, device, dtype) in self.seen if w == where}


@pytest.fixture(scope="module")
def families(tiny_zoo):
    return resolve(SourceConfig(families=(FAMILY,), zoo=tiny_zoo, source="local"))


@pytest.fixture(scope="module")
def image(tiny_zoo):
    from space.examples import PHOTOS, photo_path

    return load_image(photo_path(PHOTOS[1]), 64)


@pytest.mark.parametrize("device", DEVICES)
def test_every_tensor_of_a_request_is_on_the_requested_device(device, families, image, tmp_path):
    session = Session(families, cache_dir=tmp_path, device=device)
    target = resolve_device(device)
    models = [v.model for v in session.zoo(FAMILY).variants.values()]
    requests = {
        "explain": lambda: session.explain(FAMILY, image, "gradient"),
        "explain, smoothgrad": lambda: session.explain(FAMILY, image, "smoothgrad"),
        "features": lambda: session.features(FAMILY, "layer4", [0, 5], steps=8),
        "representations": lambda: session.representations(FAMILY),
    }
    for name, request in requests.items():
        recorder = Recorder()
        with recorder.watching(models):
            result = request()
        expected = {(str(target), "torch.float32"), (str(target), "int")}
        backward = name != "representations"  # CKA runs forwards only
        for where in ("forward in", "forward out", "saved for backward", "parameter or buffer"):
            places = recorder.places(where)
            assert places or (where == "saved for backward" and not backward), f"{name}: nothing {where}"
            assert places <= expected, f"{name}: {where} on {places - expected}, expected only {target} float32"
        assert result is not None
    explanation = requests["explain"]()
    for answer in explanation.variants.values():  # drawn by the page: back on the CPU
        assert answer.gradcam.device.type == answer.saliency.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_cuda_answers_equal_the_cpu_answers_up_to_float_rounding(families, image, tmp_path):
    """The same Explain on the GPU and on the CPU: the same predictions, probabilities and maps up to
    float32 rounding (TF32 is off: ``surgery.devices.faithful``). The Space tests themselves run
    with ``--device cpu`` (conftest's ``space_app``): on the CPU the flag changes nothing they check."""
    from surgery.devices import faithful
    from surgery.similarity import map_spearman

    faithful(torch.device("cuda"))
    cpu = Session(families, cache_dir=tmp_path / "cpu", device="cpu").explain(FAMILY, image, "gradient")
    gpu = Session(families, cache_dir=tmp_path / "cuda", device="cuda").explain(FAMILY, image, "gradient")
    assert list(gpu.variants) == list(cpu.variants)
    for name, answer in cpu.variants.items():
        other = gpu.variants[name]
        assert torch.equal(answer.probabilities.argmax(-1), other.probabilities.argmax(-1)), name
        assert (answer.probabilities - other.probabilities).abs().max() <= 1e-4, name
        for maps in ("gradcam", "saliency"):
            a, b = getattr(answer, maps), getattr(other, maps)
            assert float(map_spearman(a.reshape(1, *a.shape[-2:]), b.reshape(1, *b.shape[-2:]))[0]) >= 0.99, (name, maps)


def test_move_readies_the_compiled_quantizer_kernels_of_an_int8_model(families):
    """Where a C++ compiler and ninja are on the machine (CI installs them), NNCF's quantizers run its
    compiled CPU extension, not its 1.5-8x slower torch fallback."""
    require(compiler_missing())
    int8 = families[FAMILY].variants["int8"].model
    assert compression.quantizers(int8)
    move(int8, torch.device("cpu"))
    assert compression.quantizer_backend("cpu") == "compiled extension"
