"""The checkpoint format: the loader runs NNCF's quantizers, never unpickles, and refuses bad files
through every entry point.

Exact reloads of every variant (outputs, bit widths, levels) and the zeros of sparse files are
checked on the whole ladder in ``tests/test_ladder.py``; the checkpoints here are that zoo's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from surgery import CheckpointError, compression, load_variant
from surgery.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from surgery.data import ShapesDataset, ShapesSpec
from surgery.variants import parse_variant
from test_ladder import edit_weights


def _images(n: int = 8) -> torch.Tensor:
    return ShapesDataset(ShapesSpec("val", n)).images.float() / 255


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_reloaded_quantized_model_runs_nncf_quantizers(untrained_zoo, kind):
    model, config = load_variant(untrained_zoo / kind)
    quantizers = compression.quantizers(model)
    assert len(quantizers) > 20
    calls = []
    handles = [q.register_forward_hook(lambda *_: calls.append(1)) for q in quantizers]
    with torch.no_grad():
        model(_images(2))
    for h in handles:
        h.remove()
    assert len(calls) >= len(quantizers)  # every quantizer really ran in the forward pass
    spec = parse_variant(kind)
    assert {q.num_bits for q in quantizers} == {8, spec.weight_bits}


def test_loader_never_unpickles(untrained_zoo, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called: the loader must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    kinds = set()
    for directory in sorted(d for d in untrained_zoo.iterdir() if (d / CONFIG_FILE).exists()):
        kinds.add(load_variant(directory).config["kind"])
    assert kinds == {"fp32", "quantized", "sparse"}


@pytest.fixture
def copy_of(untrained_zoo, tmp_path):
    def make(kind: str) -> Path:
        return Path(shutil.copytree(untrained_zoo / kind, tmp_path / kind))
    return make


def test_refuses_pickled_checkpoint(copy_of):
    d = copy_of("fp32")
    torch.save({"weights": 1}, d / "pytorch_model.bin")
    (d / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*pytorch_model\.bin.*never loaded"):
        load_variant(d)


def test_refuses_truncated_weights(copy_of):
    d = copy_of("fp32")
    path = d / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}.*truncated, corrupt or was modified"):
        load_variant(d)


def test_every_entry_point_refuses_a_tampered_checkpoint(copy_of, tmp_path, caplog):
    """Bytes changed after the hash was recorded: the loader, the Hub export's staging and the
    OpenVINO export (library and command line) each refuse it by name, and write nothing."""
    from hub_export import stage
    from hub_export import openvino as deploy
    from hub_export.cli import main as hub_export_main

    d = copy_of("sparse90")
    with open(d / WEIGHTS_FILE, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}.*SHA-256"):
        load_variant(d)
    with pytest.raises(CheckpointError, match="SHA-256"):
        stage(d, "org/tampered", tmp_path / "staged")
    with pytest.raises(CheckpointError, match="SHA-256"):
        deploy.export(d, tmp_path / "ir")
    assert hub_export_main(["openvino", str(d), "--out", str(tmp_path / "ir")]) == 2
    assert "does not match config.json" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "staged").exists() and not (tmp_path / "ir" / deploy.IR_XML).exists()


def test_refuses_reshaped_tensor_even_with_fixed_hash(copy_of):
    d = copy_of("fp32")
    edit_weights(d, lambda t, m: ({**t, "fc.weight": t["fc.weight"][:5]}, m))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: weights do not fit.*fc\.weight"):
        load_variant(d)


def test_refuses_foreign_module_in_nncf_config(copy_of):
    d = copy_of("int4")

    def inject(tensors, metadata):
        config = json.loads(metadata["nncf_config"])
        config["compression_state"][0].update(module_path="subprocess", module_cls_name="Popen")
        return tensors, {**metadata, "nncf_config": json.dumps(config)}

    edit_weights(d, inject)
    with pytest.raises(CheckpointError, match=r"cannot restore NNCF modules"):
        load_variant(d)


def test_refuses_bad_config(copy_of):
    d = copy_of("fp32")
    (d / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}: not a readable JSON config"):
        load_variant(d)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_variant(tmp_path / "nope")
