"""The model zoo: targets of the real shapes zoo, every dataset's code path, DDP, resume, the dataset."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision

from surgery import build_model, load_variant, read_config
from surgery.checkpoint import WEIGHTS_FILE
from surgery.data import ShapesDataset, ShapesSpec, build_dataset
from surgery.registry import get_family
from training import distributed
from training.cli import main as training_main
from training.loop import fit, predict

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


# --- the real resnet18-shapes zoo -------------------------------------------------------------

# Floors on the trained zoo, set from the zoo as each kind of CPU trains it (FP32 under bfloat16
# autocast where the CPU has it, in FP32 elsewhere), with margin. Shapes recipe of 640 steps, seeds
# 0/1/2: held-out top-1 of FP32 0.985/0.990/0.989 (bfloat16, Xeon with AMX) and 0.985/0.982/0.994
# (the same CPU limited to AVX2); on 500 fresh images 0.978/0.984/0.984 and 0.982/0.974/0.980;
# INT8's agreement with FP32 (seed 0) 0.996 and 0.998.
FP32_TOP1_FLOOR, FRESH_TOP1_FLOOR, INT8_AGREEMENT_FLOOR = 0.96, 0.95, 0.98


def test_zoo_meets_accuracy_targets(shapes_zoo):
    metrics = {v: read_config(shapes_zoo / v)["metrics"] for v in ("fp32", "int8", "sparse90")}
    top1 = {v: m["top1"] for v, m in metrics.items()}
    assert top1["fp32"] >= FP32_TOP1_FLOOR, top1  # 1,000 held-out images
    assert top1["int8"] >= top1["fp32"] - 0.01, top1
    assert top1["sparse90"] >= top1["fp32"] - 0.03, top1
    assert metrics["int8"]["agreement_with_fp32"] >= INT8_AGREEMENT_FLOOR


def test_seed_control_differs_only_in_its_seed(tiny_zoo):
    base, control = read_config(tiny_zoo / "fp32"), read_config(tiny_zoo / "fp32-seed1")
    assert control["recipe"]["seed"] == base["recipe"]["seed"] + 1
    assert {**control["recipe"], "seed": 0} == {**base["recipe"], "seed": 0}
    a, b = (safetensors.torch.load_file(tiny_zoo / v / WEIGHTS_FILE) for v in ("fp32", "fp32-seed1"))
    assert a.keys() == b.keys() and not torch.equal(a["conv1.weight"], b["conv1.weight"])


def test_stored_metrics_are_reproduced_by_evaluate(untrained_zoo, tmp_path):
    """`evaluate` on the reloaded INT8 model reproduces the accuracy and agreement saved at training."""
    work = tmp_path / "int8"
    work.mkdir()
    for f in (untrained_zoo / "int8").iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    stored = read_config(work)["metrics"]
    eval_samples = ["--eval-samples", str(stored["eval_samples"])]
    assert training_main(["evaluate", str(work), "--fp32", str(untrained_zoo / "fp32"), *eval_samples]) == 0
    fresh = read_config(work)["metrics"]
    assert fresh["top1"] == stored["top1"] and fresh["agreement_with_fp32"] == stored["agreement_with_fp32"]
    assert fresh["per_class_top1"] == stored["per_class_top1"]
    assert set(fresh["per_class_top1"]) == set(get_family("resnet18-shapes").class_names)


def test_trained_model_really_classifies(shapes_zoo):
    """500 fresh images (another seed than training and evaluation) are classified."""
    model, config = load_variant(shapes_zoo / "fp32")
    fresh = ShapesDataset(ShapesSpec("val", 500, seed=7))
    with torch.no_grad():
        predictions = torch.cat([model(x.float() / 255).argmax(1) for x in fresh.images.split(250)])
    assert (predictions == fresh.labels).float().mean() >= FRESH_TOP1_FLOOR


# --- the command line: any bit width, any sparsity, zoos of any variants ---------------------------

SMALL = ["--train-samples", "64", "--eval-samples", "16", "--epochs", "1", "--max-steps", "1"]


def test_quantize_and_sparse_commands_name_their_variants(untrained_zoo, tmp_path):
    fp32 = str(untrained_zoo / "fp32")
    assert training_main(["quantize", "--bits", "3", "--activation-bits", "8", "--fp32", fp32,
                          "--out", str(tmp_path / "a"), "--calibration-samples", "16", *SMALL]) == 0
    assert training_main(["int8", "--fp32", fp32, "--out", str(tmp_path / "b"), "--calibration-samples", "16",
                          *SMALL]) == 0
    assert training_main(["sparse", "--sparsity", "0.98", "--fp32", fp32, "--out", str(tmp_path / "c"), *SMALL]) == 0
    w3a8, int8, sparse98 = (read_config(tmp_path / d) for d in "abc")
    assert (w3a8["variant"], w3a8["compression"]["weight_bits"], w3a8["compression"]["activation_bits"]) == ("w3a8", 3, 8)
    assert int8["variant"] == "int8" and {q["bits"] for q in int8["compression"]["quantizers"].values()} == {8}
    assert sparse98["variant"] == "sparse98" and sparse98["metrics"]["sparsity"] >= 0.98 - 1e-6


def test_bad_bit_width_is_a_clear_error(untrained_zoo, tmp_path, caplog):
    assert training_main(["quantize", "--bits", "1", "--fp32", str(untrained_zoo / "fp32"),
                          "--out", str(tmp_path / "q"), *SMALL]) == 2
    assert "bit widths must be between 2 and 8" in caplog.text and not (tmp_path / "q").exists()


def test_zoo_refuses_an_unknown_variant_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        training_main(["zoo", "--family", "resnet18-shapes", "--out", str(tmp_path), "--variants", "fp32,fp16"])
    assert exit_.value.code == 2 and "not a variant name: 'fp16'" in capsys.readouterr().err


def test_zoo_build_order_puts_each_source_first():
    from training.cli import zoo_variants

    assert zoo_variants() == ["fp32", "int8", "sparse90"]
    assert zoo_variants(["int4", "sparse95"]) == ["fp32", "int4", "sparse95"]
    assert zoo_variants(["int4-seed1"], seeds=3) == ["fp32-seed1", "int4-seed1", "fp32-seed2"]
    ladder = zoo_variants(ladder=True, seeds=2)
    assert ladder[0] == "fp32" and ladder[-1] == "fp32-seed1" and len(ladder) == len(set(ladder)) == 12


def test_zoo_skips_what_is_built(untrained_zoo, caplog):
    """Rerunning the fixture's command changes no file: every variant is already built."""
    from builds import UNTRAINED_ZOO_ARGS

    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in untrained_zoo.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="training"):
        assert training_main(["zoo", "--family", "resnet18-shapes", "--out", str(untrained_zoo), *UNTRAINED_ZOO_ARGS]) == 0
    assert caplog.text.count("already built") == 12
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in untrained_zoo.rglob("*") if p.is_file()} == before


def test_interrupted_zoo_build_resumes_with_the_rest(tmp_path):
    from training.cli import Settings, build_zoo

    settings = Settings(train_samples=64, eval_samples=16, epochs=1, max_steps=1)

    class Interrupt(Exception):
        pass

    def stop(name, directory):
        raise Interrupt(name)

    with pytest.raises(Interrupt, match="fp32"):
        build_zoo("resnet18-shapes", tmp_path, ["fp32", "int4"], settings=settings, on_built=stop)
    assert (tmp_path / "fp32" / "config.json").exists() and not (tmp_path / "int4").exists()
    fp32_bytes = (tmp_path / "fp32" / WEIGHTS_FILE).read_bytes()
    built = []
    results = build_zoo("resnet18-shapes", tmp_path, ["fp32", "int4"], settings=settings,
                        on_built=lambda name, directory: built.append((name, directory)))
    assert built == [("int4", tmp_path / "int4")]
    assert set(results) == {"fp32", "int4"} and (tmp_path / "fp32" / WEIGHTS_FILE).read_bytes() == fp32_bytes
    # INT4 was derived from the FP32 model saved before the interruption, and measured against it.
    int4, fp32 = (load_variant(tmp_path / v)[0] for v in ("int4", "fp32"))
    eval_set = build_dataset(get_family("resnet18-shapes"), "eval", samples=settings.eval_samples)  # as the CLI
    agreement = (predict(int4, eval_set, torch.device("cpu"))[0].argmax(1)
                 == predict(fp32, eval_set, torch.device("cpu"))[0].argmax(1)).double().mean().item()
    assert read_config(tmp_path / "int4")["metrics"]["agreement_with_fp32"] == pytest.approx(agreement, abs=1e-12)


# --- the dataset --------------------------------------------------------------------------------

def test_shapes_is_deterministic_with_masks():
    a, b = ShapesDataset(ShapesSpec("val", 20)), ShapesDataset(ShapesSpec("val", 20))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    other = ShapesDataset(ShapesSpec("val", 20, seed=1))
    assert not torch.equal(a.images, other.images)
    coverage = a.masks.flatten(1).float().mean(1)
    assert (coverage > 0.05).all() and (coverage < 0.6).all()
    assert len(set(a.labels.tolist())) == 10


def test_shapes_defeats_a_linear_classifier_on_pixels():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, test = ShapesDataset(ShapesSpec("train", 1500)), ShapesDataset(ShapesSpec("test", 400))
    scaler = StandardScaler().fit(train.images.flatten(1).numpy())
    x, x_test = (scaler.transform(d.images.flatten(1).numpy()) for d in (train, test))
    # The L2-penalised optimum lies in the span of the 1,500 training rows (representer theorem), so
    # fitting on coordinates in an orthonormal basis of that span gives the same classifier as on the
    # 12,288 pixels, in an eighth of the time.
    basis = np.linalg.qr(x.T)[0]
    clf = LogisticRegression(max_iter=200, C=0.01).fit(x @ basis, train.labels.numpy())
    accuracy = clf.score(x_test @ basis, test.labels.numpy())
    logger.info("logistic regression on raw shapes pixels: %.3f held-out accuracy (chance 0.1)", accuracy)
    assert accuracy < 0.6


# --- CIFAR-10 and ImageNet code paths on generated stand-in data ---------------------------------

def _write_cifar10(root: Path, per_batch: int = 20) -> None:
    """A CIFAR-10 tree in the official python format (pickled dicts), with generated pixels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [int(i % 10) for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": list(get_family("resnet18-cifar10").class_names)}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar10_path_end_to_end(tmp_path, monkeypatch):
    _write_cifar10(tmp_path / "data")
    # The only thing generated data cannot pass is the MD5 of the official archive's files.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    common = ["--data-root", str(tmp_path / "data"), "--max-steps", "1", "--batch-size", "8", "--workers", "0"]
    assert training_main(["fp32", "--family", "resnet18-cifar10", "--out", str(tmp_path / "fp32"),
                          "--epochs", "1", *common]) == 0
    assert training_main(["int8", "--fp32", str(tmp_path / "fp32"), "--out", str(tmp_path / "int8"),
                          "--calibration-samples", "16", *common]) == 0
    assert training_main(["sparse", "--fp32", str(tmp_path / "fp32"), "--out", str(tmp_path / "sparse90"),
                          "--epochs", "2", *common]) == 0
    for variant in ("fp32", "int8", "sparse90"):  # `sparse` without --sparsity: the family's 90%
        model, config = load_variant(tmp_path / variant)
        assert config["family"] == "resnet18-cifar10" and config["metrics"]["eval_samples"] == 20
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert read_config(tmp_path / "sparse90")["metrics"]["sparsity"] >= 0.9 - 1e-6  # up to a weight


def test_cifar10_missing_is_a_clear_error(tmp_path, caplog):
    assert training_main(["fp32", "--family", "resnet18-cifar10", "--out", str(tmp_path / "o"),
                          "--data-root", str(tmp_path)]) == 2
    assert "CIFAR-10 not found" in caplog.text and "--download" in caplog.text


def test_imagenet_path_with_torchvision_weights(imagenet_stand_in, mobilenet_weights, tmp_path, monkeypatch):
    """FP32 is torchvision's weights file (in the cache a download would fill), checked and used as it is."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / mobilenet_weights.name
    cached.parent.mkdir(parents=True)
    cached.symlink_to(mobilenet_weights)
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(mobilenet_weights, weights_only=True))
    out = tmp_path / "zoo"
    common = ["--data-root", str(imagenet_stand_in), "--batch-size", "2", "--max-steps", "1", "--workers", "0",
              "--train-samples", "4", "--eval-samples", "4"]
    assert training_main(["fp32", "--family", "mobilenetv2-imagenet", "--out", str(out / "fp32"), *common]) == 0
    assert read_config(out / "fp32")["compression"]["init"] == "torchvision IMAGENET1K_V1"
    model, _ = load_variant(out / "fp32")
    assert torch.equal(model.classifier[1].weight, reference.classifier[1].weight)  # 0 epochs: as they are
    assert training_main(["int8", "--fp32", str(out / "fp32"), "--out", str(out / "int8"),
                          "--calibration-samples", "2", *common]) == 0
    int8, config = load_variant(out / "int8")
    assert config["metrics"]["eval_samples"] == 4 and len(config["compression"]["quantizers"]) > 50
    assert {q["bits"] for q in config["compression"]["quantizers"].values()} == {8}


def test_a_weights_file_that_is_not_torchvisions_is_refused(imagenet_stand_in, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = Path(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url).name
    cached = tmp_path / "torch" / "hub" / "checkpoints" / name
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), cached)  # right keys, not torchvision's weights
    assert training_main(["fp32", "--family", "resnet50-imagenet", "--out", str(tmp_path / "o"),
                          "--data-root", str(imagenet_stand_in)]) == 2
    assert f"{cached}: SHA-256" in caplog.text and "not that of torchvision's" in caplog.text
    assert not (tmp_path / "o" / "config.json").exists()


def test_imagenet_without_weights_needs_epochs(imagenet_stand_in, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    assert training_main(["fp32", "--family", "resnet50-imagenet", "--out", str(tmp_path / "o"),
                          "--data-root", str(imagenet_stand_in)]) == 2
    assert "network unreachable" in caplog.text and "pass --epochs" in caplog.text


# --- distributed and resume ------------------------------------------------------------------------

def test_ddp_two_cpu_processes_train_and_save_once(tmp_path):
    out = tmp_path / "fp32"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training", "fp32", "--family", "resnet18-shapes", "--out", str(out),
           "--train-samples", "128", "--eval-samples", "32", "--epochs", "1", "--max-steps", "3",
           "--batch-size", "16"]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "rank 0 of 2" in log and "rank 1 of 2" in log
    assert log.count(f"saved resnet18-shapes/fp32 to {out}") == 1
    config = read_config(out)
    assert config["recipe"]["world_size"] == 2
    model, _ = load_variant(out)
    untrained = build_model("resnet18-shapes")
    assert not torch.equal(model.conv1.weight, untrained.conv1.weight)


def test_resume_continues_exactly(tmp_path):
    """An interrupted run, restarted, ends with the same weights as an uninterrupted one."""
    family = get_family("resnet18-shapes")
    data = ShapesDataset(ShapesSpec("train", 64))
    recipe = family.fp32.with_overrides(epochs=2, steps_per_epoch=2, batch_size=16)
    ctx = distributed.Context()

    def fresh():
        torch.manual_seed(0)
        return build_model(family)

    straight = fit(fresh(), data, recipe, ctx, seed=0, state_dir=tmp_path / "a", desc="t")

    class Interrupt(Exception):
        pass

    def stop_in_second_epoch(step, steps_per_epoch):
        if step == steps_per_epoch:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(fresh(), data, recipe, ctx, seed=0, state_dir=tmp_path / "b", desc="t", on_step=stop_in_second_epoch)
    torch.manual_seed(999)  # the restart must not depend on the process's RNG state
    resumed = fit(fresh(), data, recipe, ctx, seed=0, state_dir=tmp_path / "b", desc="t")
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
