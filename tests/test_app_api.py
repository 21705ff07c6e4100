"""The Space through its API, as ``gradio_client`` sees it: every tab's action, bad input, model sources."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import space  # noqa: F401  (switches off analytics and telemetry before gradio is imported)
import numpy as np
import pytest
import yaml
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from space.examples import PHOTOS, photo_path, write_examples
from space.zoo_source import SourceConfig, SourceError, resolve
from hub_servers import PULL_DEADLINE_S, closed_endpoint
from conftest import handlers_of
from test_images import png_header_only
from surgery import attribution, compression, load_variant
from surgery.actmax import activation_maximization
from surgery.data import offline_available
from surgery.images import load_image
from surgery.registry import get_family
from surgery.similarity import map_spearman, topk_iou
from surgery.variants import parse_variant

VARIANTS = ("fp32", "int8", "sparse90")  # the tiny zoo's default columns (it has no int4)
COLUMNS = 4  # column slots per answer: (title, top-5, GradCAM, saliency) each
FAMILY = "resnet18-shapes"
ENDPOINTS = ("/explain", "/features", "/representations", "/models")


@pytest.fixture(scope="module")
def client(space_app) -> Client:
    return Client(space_app.local_url, verbose=False)


@pytest.fixture(scope="module")
def example() -> Path:
    """A photo upload (the shapes family's Examples are shapes: see test_examples_follow_the_family)."""
    return photo_path(next(p for p in PHOTOS if p.file == "chelsea.png"))


def _example_paths(demo) -> list[str]:
    """The example files the page offers (from the Examples dataset in the page config)."""
    for component in demo.config["components"]:
        if component.get("type") == "dataset":
            return [row[0]["path"] for row in component["props"]["samples"]]
    raise AssertionError("the page has no examples")


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_every_tab_has_a_stable_api_name(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(ENDPOINTS) <= set(endpoints)


def test_the_page_says_where_the_models_come_from(space_app, tiny_zoo):
    with urllib.request.urlopen(f"{space_app.local_url}config") as response:
        config = response.read().decode()
    assert "Models shown here come from" in config and f"local zoo {tiny_zoo}" in config


def test_examples_follow_the_family(space_app, client):
    """Shapes get held-out shapes with their true classes, never photos; photo families get photos."""
    names = [Path(p).name for p in _example_paths(space_app)]
    assert len(names) == 10 and all(n.startswith("shapes-") for n in names)
    assert {n.split("-", 2)[2].removesuffix(".png") for n in names} == set(get_family(FAMILY).class_names)
    update = client.predict(FAMILY, api_name="/examples")
    assert [Path(row[0]).name for row in update["samples"]] == names  # the client downloads each file
    photos = write_examples(Path(space_app.GRADIO_CACHE) / "photo-examples", ["resnet18-cifar10"])
    assert [e.path.name for e in photos["resnet18-cifar10"]] == [p.file for p in PHOTOS]


def test_explain_matches_the_models_run_directly(client, example, tiny_zoo):
    out = client.predict(handle_file(str(example)), FAMILY, "gradient", api_name="/explain")
    assert len(out) == 4 * COLUMNS + 1
    x = load_image(example, 64)[None]
    direct = {}
    for i, variant in enumerate(VARIANTS):
        model, config = load_variant(tiny_zoo / variant)
        direct[variant] = attribution.explain(model, x, layer="layer4")
        title, label, cam, sal = out[4 * i: 4 * i + 4]
        assert title == f"### {parse_variant(variant).title}"
        probabilities, indices = direct[variant].probabilities[0].topk(5)
        assert [c["label"] for c in label["confidences"]] == [config["class_names"][j] for j in indices]
        np.testing.assert_allclose([c["confidence"] for c in label["confidences"]], probabilities, atol=1e-6)
        for image in (cam, sal):
            pixels = _pixels(image)
            assert pixels.shape == (128, 128, 3) and pixels.std() > 1  # a map, not a blank square
    assert out[12] == "" and out[14] is None and out[15] is None  # the fourth column is unused
    rows = out[-1]["data"]
    assert [r[0] for r in rows] == ["INT8 (W8A8)", "90% sparse"]
    fp32 = direct["fp32"]
    for row, variant in zip(rows, VARIANTS[1:]):
        other = direct[variant]
        same = bool(fp32.target[0] == other.target[0])
        assert row[1] == ("yes" if same else "no")
        expected = [map_spearman(fp32.gradcam, other.gradcam), topk_iou(fp32.gradcam, other.gradcam),
                    map_spearman(fp32.saliency, other.saliency), topk_iou(fp32.saliency, other.saliency)]
        np.testing.assert_allclose(row[2:], [float(e[0]) for e in expected], atol=6e-5)


def test_saliency_methods_change_only_the_saliency_maps(client, example):
    plain = client.predict(handle_file(str(example)), FAMILY, "gradient", api_name="/explain")
    smooth = client.predict(handle_file(str(example)), FAMILY, "smoothgrad", api_name="/explain")
    for i in range(3):
        assert plain[4 * i + 1] == smooth[4 * i + 1]  # same top-5
        assert np.array_equal(_pixels(plain[4 * i + 2]), _pixels(smooth[4 * i + 2]))  # same GradCAM
        assert not np.array_equal(_pixels(plain[4 * i + 3]), _pixels(smooth[4 * i + 3]))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


BAD_UPLOADS = {
    "notes.txt": (b"not an image at all\n" * 10, "not an image file"),
    "empty.png": (b"", "empty"),
    "truncated.png": (_png(Image.effect_noise((200, 200), 60).convert("RGB"))[:3000], "corrupt or truncated"),
    "bomb.png": (None, "megapixels"),
    "dot.png": (_png(Image.new("RGB", (1, 1))), "1x1 pixels"),
}


@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
def test_bad_uploads_get_a_clear_message_and_the_server_stays_up(client, example, tmp_path, name):
    data, message = BAD_UPLOADS[name]
    if data is None:  # a PNG header declaring 60000 x 60000 pixels, then almost nothing
        data = png_header_only(60_000, 60_000)
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(AppError, match=message) as error:
        client.predict(handle_file(str(path)), FAMILY, "gradient", api_name="/explain")
    assert "Traceback" not in str(error.value) and name in str(error.value)
    label = client.predict(handle_file(str(example)), FAMILY, "gradient", api_name="/explain")[1]
    assert len(label["confidences"]) == 5


@pytest.mark.parametrize("args, message", [
    ((None, FAMILY, "gradient"), "no image"),
    (("EXAMPLE", "resnet99-nothing", "gradient"), "not loaded"),
    (("EXAMPLE", FAMILY, "occlusion"), "unknown saliency method"),
])
def test_bad_explain_arguments_get_a_clear_message(client, example, args, message):
    args = tuple(handle_file(str(example)) if a == "EXAMPLE" else a for a in args)
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/explain")


def test_features_serve_the_precomputed_channels_equal_to_a_fresh_run(client, tiny_zoo):
    out = client.predict(FAMILY, "layer4", "0, 1, 2, 3", 8, api_name="/features")
    titles, galleries = out[0::2], out[1::2]
    assert list(titles) == ["### FP32", "### INT8 (W8A8)", "### 90% sparse", ""]
    assert [len(g or []) for g in galleries] == [4, 4, 4, 0]
    assert [item["caption"] for item in galleries[0]] == [f"layer4 channel {c}" for c in range(4)]
    model, _ = load_variant(tiny_zoo / "fp32")
    fresh = activation_maximization(model, "layer4", [0, 1, 2, 3], steps=8, seed=0, size=64).images
    fresh = (fresh.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for item, expected in zip(galleries[0], fresh):
        assert np.array_equal(_pixels(item["image"]), expected)
    # Each column is its own variant's model: 90% sparse is another network, its picture differs. (FP32 and
    # INT8, two training steps apart in the untrained zoo, may round to the same 8-bit picture.)
    assert not np.array_equal(_pixels(galleries[0][0]["image"]), _pixels(galleries[2][0]["image"]))


@pytest.mark.parametrize("layer, channels, steps, message", [
    ("layer4", "0, 600", 64, "channels 0 to 511"),
    ("layer4", "one, two", 64, "whole numbers"),
    ("layer4", ",".join(map(str, range(9))), 64, "at most 8 channels"),
    ("layer4", "0", 5000, "greater than maximum value 256"),  # Gradio checks slider and dropdown bounds
    ("fc", "0", 64, "not in the list of choices"),
])
def test_features_refuse_out_of_bounds_requests(client, layer, channels, steps, message):
    with pytest.raises(AppError, match=message):
        client.predict(FAMILY, layer, channels, steps, api_name="/features")


def test_representations_compare_fp32_with_every_variant_and_the_seed_control(client):
    gallery, reading = client.predict(FAMILY, api_name="/representations")
    captions = [item["caption"] for item in gallery]
    assert captions == ["FP32 vs INT8 (W8A8)", "FP32 vs 90% sparse", "FP32 vs FP32, seed 1 (control)"]
    for item in gallery:
        assert _pixels(item["image"]).std() > 1
    diagonal = {}
    for line in reading.splitlines():
        if "diagonal CKA" in line:
            name = line.split("**")[1]
            diagonal[name] = float(line.split("diagonal CKA ")[1].split()[0])
    assert set(diagonal) == {"int8", "sparse90", "fp32-seed1"}
    # INT8 is fine-tuned from this very FP32 model; the control was trained from another start.
    assert diagonal["int8"] > diagonal["fp32-seed1"]
    # One control gives no spread between seeds: the study's rule, which the tab uses, makes no call.
    assert "Rule (the study's): one-sided 95% prediction bound" in reading
    assert "No verdict: the rule needs at least 3 FP32 seeds" in reading and "further from FP32" not in reading


def test_models_tab_reports_each_variant_from_its_files(client, tiny_zoo):
    table, text = client.predict(FAMILY, api_name="/models")
    rows = {row[0]: row for row in table["data"]}
    assert list(rows) == ["FP32", "INT8 (W8A8)", "90% sparse", "FP32, seed 1"]  # every variant, in order
    for title, variant in (("FP32", "fp32"), ("INT8 (W8A8)", "int8"), ("90% sparse", "sparse90")):
        model, config = load_variant(tiny_zoo / variant)
        row = rows[title]
        assert row[1] == pytest.approx(config["metrics"]["top1"], abs=1e-4)
        assert row[3] == pytest.approx(compression.weight_sparsity(model)["overall"], abs=1e-4)
        assert row[4] == pytest.approx((tiny_zoo / variant / "model.safetensors").stat().st_size / 1e6, abs=0.01)
        assert str(tiny_zoo / variant) in row[5] and f'load_variant("{tiny_zoo / variant}")' in text
    assert rows["90% sparse"][3] >= 0.89
    assert rows["INT8 (W8A8)"][2] == pytest.approx(
        load_variant(tiny_zoo / "int8").config["metrics"]["agreement_with_fp32"], abs=1e-4)


# -- where the models come from -------------------------------------------------------------------

def test_local_source_without_a_zoo_says_what_is_missing(tmp_path):
    with pytest.raises(SourceError, match="no local zoo with an fp32 model"):
        resolve(SourceConfig(families=("resnet18-shapes",), zoo=tmp_path, source="local"))


def test_a_zoo_without_fp32_is_not_served(tiny_zoo, tmp_path):
    (tmp_path / "int8").symlink_to(tiny_zoo / "int8")
    with pytest.raises(SourceError, match="no local zoo with an fp32 model"):
        resolve(SourceConfig(families=("resnet18-shapes",), zoo=tmp_path, source="local"))


def test_a_zoo_is_served_with_whatever_it_holds_besides_fp32(tiny_zoo, tmp_path):
    for variant in ("fp32", "sparse90"):
        (tmp_path / variant).symlink_to(tiny_zoo / variant)
    (tmp_path / "notes").mkdir()  # not a variant name: ignored
    zoo = resolve(SourceConfig(families=("resnet18-shapes",), zoo=tmp_path, source="local"))["resnet18-shapes"]
    assert list(zoo.variants) == ["fp32", "sparse90"] and not zoo.pending


def _resolve_in_a_fresh_process(endpoint: str, home: Path, org: str, zoo: Path,
                                deadline: str | None = None) -> tuple[dict, str]:
    """``resolve`` for resnet18-shapes in a new process: huggingface_hub reads HF_ENDPOINT at import."""
    script = ("import json, sys; from space.zoo_source import SourceConfig, resolve; "
              "zoos = resolve(SourceConfig(hub_org=sys.argv[1], families=('resnet18-shapes',), zoo=sys.argv[2])); "
              "print(json.dumps({name: {'origin': z.origin, 'variants': {v: [x.repo_id, x.config['weights']['sha256']] "
              "for v, x in z.variants.items()}} for name, z in zoos.items()}))")
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1"}
    if deadline:
        env["SURGERY_HUB_DEADLINE_S"] = deadline
    done = subprocess.run([sys.executable, "-c", script, org, str(zoo)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["resnet18-shapes"], done.stderr


def _sha(zoo: Path, variant: str) -> str:
    return json.loads((zoo / variant / "config.json").read_text())["weights"]["sha256"]


def test_the_hub_comes_first(hub, tiny_zoo, tmp_path):
    # The zoo's variants as Hub repos ORG/<family>-<variant>, served by the session's Hub mirror (olah).
    for variant in VARIANTS:
        repo_id = f"space-test/resnet18-shapes-{variant}"
        hub.stand_in.repos.create(repo_id)
        hub.stand_in.repos.commit(repo_id, "main", {f.name: f.read_bytes() for f in (tiny_zoo / variant).iterdir()},
                                  [], "add")
    # The local zoo holds the same models: the Hub must still be the one chosen.
    found, log = _resolve_in_a_fresh_process(hub.olah.url, tmp_path / "hf", "space-test", tiny_zoo, PULL_DEADLINE_S)
    assert found["origin"] == "Hugging Face Hub (space-test)"
    assert found["variants"] == {v: [f"space-test/resnet18-shapes-{v}", _sha(tiny_zoo, v)] for v in VARIANTS}
    assert "no space-test/resnet18-shapes-fp32-seed1 on the Hub" in log  # the optional control, logged


def test_unreachable_hub_falls_back_to_the_local_zoo(tiny_zoo, tmp_path):
    found, log = _resolve_in_a_fresh_process(closed_endpoint(), tmp_path / "hf", "space-test", tiny_zoo)
    assert found["origin"] == f"local zoo {tiny_zoo}"
    assert found["variants"] == {v: [None, _sha(tiny_zoo, v)] for v in (*VARIANTS, "fp32-seed1")}
    assert "cannot reach the Hub" in log  # the fallback is logged with its reason


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The Hub client in offline mode with an empty cache (it read HF_HUB_OFFLINE at import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_hub_only_source_fails_with_the_hub_reason(offline_hub):
    with pytest.raises(SourceError, match="resnet18-shapes from the Hub: .*HF_HUB_OFFLINE"):
        resolve(SourceConfig(families=("resnet18-shapes",), hub_org="nobody", source="hub"))


def test_no_source_for_a_family_that_cannot_be_built_here(offline_hub, tmp_path):
    # CIFAR-10 needs a download, so unlike resnet18-shapes it is never trained by the Space.
    with pytest.raises(SourceError) as error:
        resolve(SourceConfig(families=("resnet18-cifar10",), zoo=tmp_path))
    assert "resnet18-cifar10 from the Hub" in str(error.value)
    assert "resnet18-cifar10: no local zoo with an fp32 model" in str(error.value)


def test_space_front_matter_lists_the_default_hub_repos():
    readme = Path(__file__).parents[1] / "README.md"
    assert readme.read_text().startswith("---\n")
    meta = yaml.safe_load(readme.read_text().split("---\n")[1])
    assert (meta["sdk"], meta["sdk_version"], meta["app_file"], str(meta["python_version"])) == \
        ("gradio", "6.31.0", "app.py", "3.11")
    config = SourceConfig()
    expected = {config.repo_id(f, v) for f in config.families for v in ("fp32", "int8", "sparse90")}
    assert expected <= set(meta["models"])


def test_requests_leave_no_hooks_and_no_gradients_on_the_shared_models(client, example, space_app):
    for method in ("gradient", "smoothgrad"):
        client.predict(handle_file(str(example)), FAMILY, method, api_name="/explain")
    client.predict(FAMILY, "layer4", "5", 8, api_name="/features")  # a channel not precomputed
    session = _session(space_app)
    for variant in session.zoo(FAMILY).variants.values():
        for name, module in variant.model.named_modules():
            hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
            assert not any(hooks), f"{variant.name}/{name} keeps a hook"
        assert all(p.grad is None and not p.requires_grad for p in variant.model.parameters())


def _session(demo):
    """The Session behind a running demo (the Explain handler is bound to it)."""
    return handlers_of(demo).session


def test_study_tab_says_how_to_compute_a_missing_study(client, tiny_zoo):
    """No study of the served weights in the cache: the tab names the command that computes it."""
    curves, reading, table = client.predict(FAMILY, api_name="/study")
    assert curves == [] and "No study of these weights yet" in reading
    assert f"python -m study --zoo {tiny_zoo}" in reading


def test_the_default_families_built_here_are_the_offline_ones(monkeypatch):
    """A fresh `python app.py` builds the pretrained MobileNetV2 first, then shapes and Fashion-MNIST
    (in the background, where its files are); CIFAR-10 and ResNet50-ImageNet only come from a zoo."""
    monkeypatch.delenv("SURGERY_FAMILIES", raising=False)
    default = SourceConfig.from_env()
    assert default.families[0] == "mobilenetv2-imagenet" and "resnet18-fashionmnist" in default.families
    assert default.may_build("resnet18-shapes")
    assert default.may_build("resnet18-fashionmnist") == offline_available("resnet18-fashionmnist")
    assert not default.may_build("resnet18-cifar10") and not default.may_build("resnet50-imagenet")
    asked = SourceConfig.from_env(families="resnet18-fashionmnist")
    assert asked.may_build("resnet18-fashionmnist") == offline_available("resnet18-fashionmnist")
    assert not SourceConfig.from_env(families="resnet18-cifar10").may_build("resnet18-cifar10")
    assert not SourceConfig.from_env(families="resnet18-shapes", source="local").may_build("resnet18-shapes")
