"""The checkpoint format: exact reload of every variant kind, and refusal of bad files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from surgery import CheckpointError, compression, load_variant
from surgery.checkpoint import CONFIG_FILE, WEIGHTS_FILE, sha256_file
from surgery.registry import get_family
from training.loop import seed_everything
from surgery.variants import parse_variant
from training.variants import Job, derive_quantized, derive_sparse, train_fp32
from training import distributed
from surgery.data import ShapesDataset, ShapesSpec

# One of each kind of rung: FP32, 8-bit (NNCF's CPU preset), 4-bit (the NPU route), mixed and 2-bit
# widths (set per quantizer), two sparsity levels.
KINDS = ("fp32", "int8", "int4", "w4a8", "int2", "sparse90", "sparse98")


@pytest.fixture(scope="module")
def trained_in_memory(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Each variant as the training functions return it, next to the directory they saved."""
    family = get_family("resnet18-shapes")
    out = tmp_path_factory.mktemp("variants")
    job = Job(family, ShapesDataset(ShapesSpec("train", 128)), ShapesDataset(ShapesSpec("test", 32)),
              distributed.Context(), seed=0)
    short = family.fp32.with_overrides(epochs=1, steps_per_epoch=2)
    fp32, _, reference = train_fp32(job, short, out / "fp32")
    c = family.compression
    variants = {"fp32": (fp32, out / "fp32")}
    for name in KINDS[1:]:
        spec = parse_variant(name)
        recipe = c.for_variant(spec).with_overrides(epochs=1, steps_per_epoch=2)
        if spec.kind == "quantized":
            model, _ = derive_quantized(job, fp32, recipe, spec, 64, out / name, reference)
        else:
            model, _ = derive_sparse(job, fp32, recipe, spec, 0.5, out / name, reference)
        variants[name] = (model, out / name)
    return variants


def _images(n: int = 8) -> torch.Tensor:
    return ShapesDataset(ShapesSpec("val", n)).images.float() / 255


@pytest.mark.parametrize("kind", KINDS)
def test_reload_gives_identical_outputs(trained_in_memory, kind):
    model, directory = trained_in_memory[kind]
    reloaded, config = load_variant(directory)
    x = _images()
    with torch.no_grad():
        expected, actual = model.eval()(x), reloaded(x)
    assert (expected - actual).abs().max().item() <= 1e-6
    assert not reloaded.training
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert config["variant"] == kind
    assert compression.bit_widths(reloaded) == compression.bit_widths(model)
    levels = {n: q.levels for n, q in compression.named_quantizers(reloaded).items()}
    assert levels == {n: q.levels for n, q in compression.named_quantizers(model).items()}
    assert all(levels[n] <= 2 ** b for n, b in compression.bit_widths(reloaded).items())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_reloaded_quantized_model_runs_nncf_quantizers(trained_in_memory, kind):
    model, config = load_variant(trained_in_memory[kind][1])
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


@pytest.mark.parametrize("kind", ["sparse90", "sparse98"])
def test_sparse_file_stores_exact_zeros(trained_in_memory, kind):
    target = parse_variant(kind).sparsity
    tensors = safetensors.torch.load_file(trained_in_memory[kind][1] / WEIGHTS_FILE)
    # conv and linear weights: 4-d kernels and the fc matrix (BN weights are 1-d)
    weights = [t for k, t in tensors.items() if k.endswith("weight") and t.dim() in (2, 4)]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    assert zeros >= math.floor(target * total)  # the target, rounded down to whole weights
    assert not any("nncf" in k for k in tensors)  # masks were baked in, not stored beside the weights


def test_loader_never_unpickles(trained_in_memory, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called: the loader must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    for _, directory in trained_in_memory.values():
        load_variant(directory)


@pytest.fixture
def copy_of(trained_in_memory, tmp_path):
    def make(kind: str) -> Path:
        return Path(shutil.copytree(trained_in_memory[kind][1], tmp_path / kind))
    return make


def _rewrite_weights(directory: Path, edit) -> None:
    """Tamper the way an attacker who also fixes the recorded hash would."""
    path = directory / WEIGHTS_FILE
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors, metadata = edit(tensors, metadata)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["weights"]["sha256"] = sha256_file(path)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


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


def test_refuses_flipped_byte(copy_of):
    d = copy_of("sparse90")
    data = bytearray((d / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (d / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_variant(d)


def test_refuses_reshaped_tensor_even_with_fixed_hash(copy_of):
    d = copy_of("fp32")
    _rewrite_weights(d, lambda t, m: ({**t, "fc.weight": t["fc.weight"][:5]}, m))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: weights do not fit.*fc\.weight"):
        load_variant(d)


def test_refuses_foreign_module_in_nncf_config(copy_of):
    d = copy_of("int4")

    def inject(tensors, metadata):
        config = json.loads(metadata["nncf_config"])
        config["compression_state"][0].update(module_path="subprocess", module_cls_name="Popen")
        return tensors, {**metadata, "nncf_config": json.dumps(config)}

    _rewrite_weights(d, inject)
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


def test_seeded_training_is_reproducible(tmp_path):
    """Fixed seeds: two runs of the same recipe give bit-identical weights."""
    family = get_family("resnet18-shapes")
    data = ShapesDataset(ShapesSpec("train", 64)), ShapesDataset(ShapesSpec("test", 16))
    recipe = family.fp32.with_overrides(epochs=1, steps_per_epoch=2)
    runs = []
    for i in range(2):
        seed_everything(123)
        job = Job(family, *data, distributed.Context(), seed=0)
        runs.append(train_fp32(job, recipe, tmp_path / str(i))[0].state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
