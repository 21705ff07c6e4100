"""OpenVINO deployment: the IR of each variant runs, agrees with PyTorch, and stores what it claims.

Agreement is checked on the trained zoo (``shapes_zoo``): untrained models have near-tie logits,
and on the tiny zoo INT8's OpenVINO predictions matched PyTorch's on only 97% of 200 images
(integer kernels round differently from NNCF's float simulation, which decides near ties).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import safetensors
import torch
from torch import nn

from hub_export import openvino as deploy
from hub_export.cli import main as hub_export_main
from hub_servers import ORG, TOKEN
from hub_servers import run_client as client
from conftest import handlers_of
from surgery import load_variant

VARIANTS = ("fp32", "int8", "sparse90")
AGREEMENT_IMAGES = 200
REPO = f"{ORG}/resnet18-shapes-int8-with-openvino"  # beside the session's push of the same variant
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(shapes_zoo, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """FP32, INT8 and sparse90 of the trained zoo as IR (converted only: speed is bench_deploy's)."""
    out = tmp_path_factory.mktemp("openvino")
    return {v: (out / v, deploy.export(shapes_zoo / v, out / v, measure_speed=False)) for v in VARIANTS}


@pytest.fixture(scope="module")
def held_out(shapes_zoo) -> torch.Tensor:
    images = deploy.held_out_images(load_variant(shapes_zoo / "fp32").config, AGREEMENT_IMAGES)
    assert images is not None and len(images) == AGREEMENT_IMAGES
    return images


@pytest.mark.parametrize("variant", VARIANTS)
def test_openvino_predicts_what_the_pytorch_variant_predicts(exported, held_out, shapes_zoo, variant):
    folder, _ = exported[variant]
    model, _ = load_variant(shapes_zoo / variant)
    ours = deploy.predict(deploy.compile_ir(folder / deploy.IR_XML, batch=32), held_out)
    theirs = deploy.torch_predict(model, held_out)
    assert len(ours) == AGREEMENT_IMAGES
    assert (ours == theirs).mean() >= 0.99, f"{variant}: {(ours == theirs).mean():.3f}"


def _weight_constants(ov_model: ov.Model, op_type: str) -> list[ov.Node]:
    """The Constant that each ``op_type`` op's weights input comes from, through any decompression."""
    constants = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() == op_type:
            node = op.input_value(1).get_node()
            while node.get_type_name() != "Constant":
                node = node.input_value(0).get_node()
            constants.append(node)
    return constants


def test_int8_ir_stores_every_convolution_as_8_bit_integers(exported, shapes_zoo):
    ov_model = ov.Core().read_model(str(exported["int8"][0] / deploy.IR_XML))
    model, _ = load_variant(shapes_zoo / "int8")
    convs = _weight_constants(ov_model, "Convolution")
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 20
    assert {c.get_element_type().get_type_name() for c in convs} <= {"i8", "u8"}
    assert all(c.get_byte_size() == np.prod(list(c.get_output_shape(0))) for c in convs), "one byte a weight"
    # The integers are the weights' 8-bit levels: at most 256 distinct values per output channel.
    levels = max(len(np.unique(row)) for c in convs for row in c.get_data().reshape(c.get_output_shape(0)[0], -1))
    assert 16 < levels <= 256
    fp32 = ov.Core().read_model(str(exported["fp32"][0] / deploy.IR_XML))
    assert {c.get_element_type().get_type_name() for c in _weight_constants(fp32, "Convolution")} == {"f32"}
    report = exported["int8"][1]
    assert set(report["weights"]["stored"]) <= {"i8", "u8"} and sum(report["weights"]["stored"].values()) == 21
    assert report["files"]["model.bin"] < 0.3 * exported["fp32"][1]["files"]["model.bin"]


def test_sparse_encodings_are_smaller_than_the_dense_file(exported, shapes_zoo):
    storage = exported["sparse90"][1]["sparse_storage"]
    dense = exported["sparse90"][1]["files"]["model.bin"]
    assert storage["ir_bin_bytes"] == dense
    assert storage["deflate_bytes"] < 0.4 * dense
    # The bitmask size, recomputed from the safetensors file itself: 4-D conv and 2-D linear weights.
    expected = 0
    with safetensors.safe_open(str(shapes_zoo / "sparse90" / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            is_weight = key.endswith("weight") and t.dim() in (2, 4)
            expected += ((t.numel() + 7) // 8 + int(t.count_nonzero()) * t.element_size() if is_weight
                         else t.numel() * t.element_size())
    assert storage["bitmask_bytes"] == expected
    assert storage["bitmask_bytes"] < 0.2 * storage["dense_bytes"]


def test_export_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, caplog):
    """(A tampered checkpoint is refused by every entry point: tests/test_checkpoint.py.)"""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    assert hub_export_main(["openvino-zoo", str(tmp_path / "notes"), "--out", str(tmp_path / "out")]) == 2
    assert "no variant directories" in caplog.text
    assert hub_export_main(["openvino", str(tmp_path / "notes"), "--out", str(tmp_path / "out")]) == 2
    assert "model.safetensors: missing" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "out" / deploy.IR_XML).exists()


# -- pushed with the IR: the card's figures and code, and the Hub pull ----------------------------

@pytest.fixture(scope="module")
def hub_with_openvino(hub, tiny_zoo, tmp_path_factory):
    """INT8 of the tiny zoo pushed with ``--with-openvino`` to a repo of its own on the session's Hub."""
    root = tmp_path_factory.mktemp("hub_openvino")
    pushes = client([{"op": "cli", "args": ["push", str(tiny_zoo / "int8"), "--repo-id", REPO, "--with-openvino"]}],
                    endpoint=hub.stand_in.url, home=root / "push_home", token=TOKEN)
    assert pushes[0]["exit"] == 0, pushes
    return hub.stand_in, hub.olah, root


def test_push_with_openvino_uploads_the_ir_and_its_figures(hub_with_openvino, tiny_zoo, tmp_path):
    stand_in, _, _ = hub_with_openvino
    files = stand_in.repos.files(REPO)
    assert {"config.json", "model.safetensors", "README.md", "openvino/model.xml", "openvino/model.bin",
            "openvino/openvino.json"} <= set(files)
    report = json.loads(files["openvino/openvino.json"])
    assert report["weights"]["stored"] == {"i8": 21}
    assert report["source"]["weights_sha256"] == load_variant(tiny_zoo / "int8").config["weights"]["sha256"]
    card = files["README.md"].decode()
    measured = report["measured"]
    assert "## Deployed with OpenVINO" in card
    assert f"| `model.bin` | {len(files['openvino/model.bin']) / 1e6:.2f} MB |" in card
    assert f"{measured['latency_ms_batch1']:.2f} ms" in card and measured["machine"] in card
    # The agreement figure is the pushed IR's own: recomputed from the uploaded files on the same images.
    assert measured["agreement_images"] == deploy.DEFAULT_EVAL_IMAGES
    for name in (deploy.IR_XML, deploy.IR_BIN):
        (tmp_path / name).write_bytes(files[f"openvino/{name}"])
    model, config = load_variant(tiny_zoo / "int8")
    images = deploy.held_out_images(config, measured["agreement_images"])
    ours = deploy.predict(deploy.compile_ir(tmp_path / deploy.IR_XML, batch=32), images)
    assert measured["agreement_with_pytorch"] == float((ours == deploy.torch_predict(model, images)).mean())


def test_a_repo_with_the_ir_still_pulls_only_the_checkpoint(hub_with_openvino, tiny_zoo):
    _, olah, root = hub_with_openvino
    home = root / "pull_home"
    pulled = client([{"op": "pull", "repo": REPO, "local": str(tiny_zoo / "int8")}], endpoint=olah.url, home=home)
    assert pulled[0]["max_abs_diff"] <= 1e-6 and pulled[0]["same_config"]
    snapshot, = (home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots").iterdir()
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "model.safetensors"}


def test_the_cards_code_runs_with_openvino_alone(hub_with_openvino):
    stand_in, olah, root = hub_with_openvino
    card = stand_in.repos.files(REPO)["README.md"].decode()
    section = card.split("## Deployed with OpenVINO")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # Torch and NNCF made unimportable: the snippet must need neither.
    script = "import sys\nsys.modules['torch'] = sys.modules['nncf'] = None\n" + code
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": olah.url, "HF_HOME": str(root / "snippet_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = json.loads(stand_in.repos.files(REPO)["openvino/openvino.json"])["class_names"]
    printed = eval(done.stdout.strip().splitlines()[-1])  # the snippet prints a list of class names
    assert len(printed) == 2 and set(printed) <= set(names)


# -- the Space's Models tab ------------------------------------------------------------------------

def test_models_tab_shows_deployed_figures_with_the_machine(space_app, tiny_zoo):
    from gradio_client import Client

    from space.deployment import HEADERS
    from surgery.variants import parse_variant

    fp32, int8, sparse90 = (parse_variant(v).title for v in ("fp32", "int8", "sparse90"))
    api = Client(space_app.local_url, verbose=False)
    table, text = api.predict("resnet18-shapes", api_name="/models")
    rows = {row[0]: row for row in table["data"]}
    if any(rows[t][-1] is None for t in (fp32, int8, sparse90)):
        assert "Measuring" in text, text  # cells stay empty only while the background export runs
    handlers = handlers_of(space_app)
    handlers.deployment.wait("resnet18-shapes")
    table, text = api.predict("resnet18-shapes", api_name="/models")
    rows = {row[0]: row for row in table["data"]}
    assert table["headers"][-len(HEADERS):] == HEADERS
    weights, size, latency, throughput, agreement = (rows[int8][-len(HEADERS) + i] for i in range(5))
    assert weights == "i8x21"
    assert size < 0.3 * rows[fp32][-4]
    assert rows["90% sparse"][-4] < 0.4 * rows["FP32"][-4]  # zipped: the zeros compress
    assert rows["FP32, seed 1"][-len(HEADERS):] == [None] * len(HEADERS)
    assert deploy.machine() in text and "Measuring" not in text
    # The cells are the figures measured for these weights, cached by their hash; the agreement is
    # the cached IR's own on its held-out images.
    model, config = load_variant(tiny_zoo / "int8")
    report = deploy.cached_report(config, handlers.session.cache_dir)
    figures = deploy.summary(report)
    assert (latency, throughput) == (round(figures["latency_ms"], 2), round(figures["throughput"], 1))
    images = deploy.held_out_images(config, report["measured"]["agreement_images"])
    folder = deploy.cache_folder(config, handlers.session.cache_dir)
    ours = deploy.predict(deploy.compile_ir(folder / deploy.IR_XML, batch=32), images)
    assert agreement == round(float((ours == deploy.torch_predict(model, images)).mean()), 4)
