"""A variant deployed with OpenVINO: its IR, the precision its weights are really stored at, and its speed.

The one module that imports ``openvino``. :func:`export` loads a checkpoint with
:func:`surgery.load_variant` (safetensors + JSON: nothing unpickled, no code from the checkpoint),
converts it with ``ov.convert_model`` and writes ``model.xml`` + ``model.bin`` (the IR) and
``openvino.json`` (what was stored and measured).

What OpenVINO stores (read in its source, ``CompressWeightsWithFakeQuantize`` in
``compress_quantize_weights.cpp``, which ``convert_model`` runs, and checked by
:func:`stored_weights` on every export): a FakeQuantize on constant weights becomes a low-precision
constant followed by Convert -> (Subtract) -> Multiply. 17..256 levels are stored as ``i8``/``u8``,
3..16 levels as ``i4``/``u4`` (two weights a byte); there is no ``i3`` or ``i2``, so 4-, 3- and 2-bit
weights are all stored as 4-bit integers. FP32 and sparse variants stay ``f32`` (``compress_to_fp16``
is off, so nothing is silently halved). OpenVINO's CPU plugin has no sparse storage in the IR; its
"sparse weights decompression" (``CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE``) packs only int8
MatMul weights at compile time on AMX CPUs, not convolutions. A sparse variant's deployable size
is therefore given by two standard encodings of the same weights (:func:`sparse_storage`): the IR's
``model.bin`` deflated (zip, zlib level 6) and a bitmask encoding (one bit per conv/linear weight
plus its non-zero values; every other tensor dense).

Example:
    >>> report = export("zoo/resnet18-shapes/int8", "deploy/int8")
    >>> report["weights"]["stored"]            # element type -> conv/matmul layers stored so
    {'i8': 21}
    >>> compiled = compile_ir("deploy/int8/model.xml", batch=1)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import threading
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch
from torch import nn

from surgery import compression
from surgery.checkpoint import CONFIG_FILE, CheckpointError
from surgery.data import build_dataset
from surgery.loading import load_variant
from surgery.registry import get_family
from surgery.variants import parse_variant

logger = logging.getLogger(__name__)

FORMAT = "surgery-openvino/1"
IR_XML, IR_BIN, REPORT = "model.xml", "model.bin", "openvino.json"
FILES = (IR_XML, IR_BIN, REPORT)
SUBFOLDER = "openvino"  # where a Hub repo keeps the IR, beside the checkpoint's two files
OPENVINO_VERSION = ov.get_version().split("-")[0]
INPUT_NAME, OUTPUT_NAME = "images", "logits"
LATENCY_BATCH, THROUGHPUT_BATCH = 1, 32
DEFAULT_EVAL_IMAGES = 200
_WEIGHTED_OPS = ("Convolution", "GroupConvolution", "MatMul")
# Between a weighted op and its weights' Constant: decompression (Convert, Subtract, Multiply) and
# layout ops; the weights are always their first input.
_PASS_THROUGH = ("Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "FakeQuantize")
_DEFLATE_LEVEL = 6  # zip's default


class DeployError(CheckpointError):
    """An export or measurement that cannot be done; the message says why."""


# -- export ---------------------------------------------------------------------------------------

def export(checkpoint_dir: str | Path, out_dir: str | Path, *, measure_speed: bool = True,
           eval_images: int = DEFAULT_EVAL_IMAGES) -> dict[str, Any]:
    """Convert the variant in ``checkpoint_dir`` to OpenVINO IR in ``out_dir``; returns ``openvino.json``.

    ``measure_speed`` adds latency (batch 1), throughput (batch 32) and top-1 agreement with the
    PyTorch variant on ``eval_images`` held-out images of its family (when its data is on this
    machine) under ``"measured"``. Raises :class:`~surgery.checkpoint.CheckpointError` for anything
    that is not a valid checkpoint (tampered, truncated, pickled, not a checkpoint at all).
    """
    checkpoint_dir = Path(checkpoint_dir)
    model, config = load_variant(checkpoint_dir)
    images = held_out_images(config, eval_images) if measure_speed else None
    return export_model(model, config, out_dir, images=images, measure_speed=measure_speed)


def export_model(model: nn.Module, config: dict, out_dir: str | Path, *, images: torch.Tensor | None = None,
                 measure_speed: bool = True) -> dict[str, Any]:
    """:func:`export` for a variant already loaded (``model`` in eval mode, its ``config.json``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = parse_variant(config["variant"])
    ov_model = convert(model, config["architecture"]["input_size"])
    ov.save_model(ov_model, out_dir / IR_XML, compress_to_fp16=False)
    layers = stored_weights(ov_model)
    report: dict[str, Any] = {
        "format": FORMAT,
        "family": config["family"],
        "variant": config["variant"],
        "kind": spec.kind,
        "title": spec.title,
        "class_names": config.get("class_names"),
        "input": {"name": INPUT_NAME, "shape": [-1, 3, config["architecture"]["input_size"],
                                                 config["architecture"]["input_size"]],
                  "values": "RGB in [0, 1], NCHW float32; the model normalises inside"},
        "output": OUTPUT_NAME,
        "openvino_version": OPENVINO_VERSION,
        "source": {"weights_sha256": config["weights"]["sha256"], "safetensors_bytes": config["weights"]["bytes"]},
        "files": {name: (out_dir / name).stat().st_size for name in (IR_XML, IR_BIN)},
        "weights": {"requested_bits": spec.weight_bits if spec.kind == "quantized" else 32,
                    "stored": dict(Counter(layer["element_type"] for layer in layers)),
                    "layers": layers},
    }
    if spec.kind == "sparse":
        report["sparse_storage"] = sparse_storage(model, out_dir / IR_BIN)
    if measure_speed:
        report["measured"] = measure_ir(out_dir / IR_XML, model, config["architecture"]["input_size"], images)
    (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("exported %s/%s to %s: weights %s, %.2f MB", config["family"], config["variant"], out_dir,
                report["weights"]["stored"], report["files"][IR_BIN] / 1e6)
    return report


def export_zoo(zoo: str | Path, out: str | Path, **kwargs: Any) -> dict[str, dict]:
    """:func:`export` of every variant directory of ``zoo`` into ``out/<variant>/``; returns the reports."""
    zoo = Path(zoo)
    if not zoo.is_dir():
        raise CheckpointError(f"{zoo}: no such zoo directory")
    variants = sorted((d for d in zoo.iterdir() if (d / CONFIG_FILE).is_file()),
                      key=lambda d: parse_variant(d.name).order)
    if not variants:
        raise CheckpointError(f"{zoo}: no variant directories (with {CONFIG_FILE}) inside")
    return {d.name: export(d, Path(out) / d.name, **kwargs) for d in variants}


def convert(model: nn.Module, input_size: int) -> ov.Model:
    """``ov.convert_model`` of ``model`` with a dynamic batch dimension, input ``images``, output ``logits``.

    ``convert_model`` traces the model (TorchScript) and runs OpenVINO's offline transformations,
    which compress FakeQuantize weights (see the module docstring).
    """
    example = torch.rand(1, 3, input_size, input_size)
    with warnings.catch_warnings(), compression.forward_lock(model), torch.no_grad():
        # Tracing an NNCF model warns about Python values in its quantizers; the graph is right
        # (agreement is measured on every export).
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(model.eval(), example_input=example,
                                    input=[ov.PartialShape([-1, 3, input_size, input_size])])
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return ov_model


def stored_weights(ov_model: ov.Model) -> list[dict[str, Any]]:
    """Each convolution's and matmul's weights as the IR stores them: the Constant feeding the op.

    Follows the op's weights input back through decompression and layout ops to its Constant and
    reports its element type (``i8``, ``u8``, ``i4``, ``f32``, ...), bits per weight and bytes.
    """
    layers = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() not in _WEIGHTED_OPS:
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() in _PASS_THROUGH:
            node = node.input_value(0).get_node()
        if node.get_type_name() != "Constant":
            continue  # a matmul of two activations: no weights
        element = node.get_element_type()
        layers.append({"op": op.get_friendly_name(), "type": op.get_type_name(),
                       "element_type": element.get_type_name(), "bits": element.bitwidth,
                       "bytes": node.get_byte_size()})
    return layers


def sparse_storage(model: nn.Module, ir_bin: Path) -> dict[str, Any]:
    """Deployable sizes of a sparse variant's weights under two standard encodings (bytes).

    - ``deflate_bytes``: ``model.bin`` compressed with zlib (DEFLATE, as zip does), level 6;
    - ``bitmask_bytes``: every conv and linear weight as a bitmask (one bit per weight) plus its
      non-zero values at their dtype; every other tensor (biases, batch norm) dense.
    """
    data = ir_bin.read_bytes()
    bitmask = dense = 0
    weights = {id(m.weight) for m in compression.weight_layers(model).values()}
    for tensor in model.state_dict(keep_vars=True).values():
        size = tensor.numel() * tensor.element_size()
        dense += size
        if id(tensor) in weights:
            nonzero = int(torch.count_nonzero(tensor.detach()))
            bitmask += (tensor.numel() + 7) // 8 + nonzero * tensor.element_size()
        else:
            bitmask += size
    return {"dense_bytes": dense, "ir_bin_bytes": len(data),
            "deflate_bytes": len(zlib.compress(data, _DEFLATE_LEVEL)), "bitmask_bytes": bitmask,
            "encodings": {"deflate": "model.bin compressed with zlib (DEFLATE, zip's method), level 6",
                          "bitmask": "conv/linear weights as 1 bit per weight + non-zero values; other tensors dense"}}


# -- running and measuring ------------------------------------------------------------------------

def machine() -> str:
    """This machine's CPU, as ``/proc/cpuinfo`` (or the platform) names it, and its core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def compile_ir(xml: str | Path, batch: int, threads: int | None = None) -> ov.CompiledModel:
    """The IR compiled for the CPU at a fixed ``batch`` (static shapes run fastest), ``threads`` threads.

    ``threads`` defaults to PyTorch's intra-op thread count, so both runtimes get the same cores.
    """
    core = ov.Core()
    model = core.read_model(str(xml))
    shape = model.inputs[0].get_partial_shape()
    model.reshape([batch, *[d.get_length() for d in list(shape)[1:]]])
    return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
                                             "PERFORMANCE_HINT": "LATENCY"})


def predict(compiled: ov.CompiledModel, images: torch.Tensor) -> np.ndarray:
    """Top-1 classes of ``images`` ``[N, 3, H, W]`` through a model compiled for some batch (last batch padded)."""
    batch = compiled.inputs[0].get_shape()[0]
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch].numpy()
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(compiled(chunk)[0][:batch - pad].argmax(axis=1))
    return np.concatenate(out)


def torch_predict(model: nn.Module, images: torch.Tensor, batch: int = THROUGHPUT_BATCH) -> np.ndarray:
    """Top-1 classes of the PyTorch variant (under NNCF's forward lock)."""
    with torch.no_grad(), compression.forward_lock(model):
        return torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)]).numpy()


def held_out_images(config: dict, count: int) -> torch.Tensor | None:
    """The first ``count`` held-out images of the variant's family, or None when its data is not here."""
    family = get_family(config["family"])
    try:
        dataset = build_dataset(family, "eval", samples=count)
    except (ValueError, OSError, RuntimeError) as exc:  # a family whose data needs a root or a download
        logger.info("%s: no held-out images on this machine (%s); agreement not measured", family.name, exc)
        return None
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def measure_ir(xml: Path, model: nn.Module, input_size: int, images: torch.Tensor | None,
               latency_repeats: int = 20, throughput_repeats: int = 5) -> dict[str, Any]:
    """Median latency (batch 1, ms) and throughput (batch 32, images/s) of the IR, and its agreement.

    Agreement: fraction of ``images`` whose OpenVINO top-1 equals the PyTorch variant's.
    """
    single, batched = compile_ir(xml, LATENCY_BATCH), compile_ir(xml, THROUGHPUT_BATCH)
    one = np.random.default_rng(0).random((LATENCY_BATCH, 3, input_size, input_size), dtype=np.float32)
    many = np.random.default_rng(1).random((THROUGHPUT_BATCH, 3, input_size, input_size), dtype=np.float32)
    latency = _median_seconds(lambda: single(one), latency_repeats)
    per_batch = _median_seconds(lambda: batched(many), throughput_repeats)
    result = {"machine": machine(), "threads": int(single.get_property("INFERENCE_NUM_THREADS")),
              "inference_precision": single.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
              "latency_ms_batch1": latency * 1e3, "throughput_batch32": THROUGHPUT_BATCH / per_batch,
              "agreement_with_pytorch": None, "agreement_images": 0}
    if images is not None and len(images):
        result["agreement_with_pytorch"] = float((predict(batched, images) == torch_predict(model, images)).mean())
        result["agreement_images"] = len(images)
    return result


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` after one warm-up call. (``bench/timing.py`` is not part of the
    installed package; the benchmark, which compares runtimes side by side, uses it.)"""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_report(directory: str | Path) -> dict[str, Any]:
    """``openvino.json`` of an exported IR folder; :class:`DeployError` if missing or not this format."""
    path = Path(directory) / REPORT
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeployError(f"{path}: not a readable OpenVINO export report ({exc})") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise DeployError(f"{path}: not a {FORMAT} report")
    return report


# -- deployed figures for the Space and the study -------------------------------------------------

_CACHE_LOCK = threading.Lock()


def cache_folder(config: dict, cache_dir: str | Path) -> Path:
    """Where :func:`deployed_figures` keeps the IR and report of the variant with this ``config.json``."""
    return Path(cache_dir) / "openvino" / f"{config['weights']['sha256'][:32]}-ov{OPENVINO_VERSION}"


def cached_report(config: dict, cache_dir: str | Path) -> dict[str, Any] | None:
    """The cached ``openvino.json`` of the variant with this ``config.json``, or None."""
    try:
        return read_report(cache_folder(config, cache_dir))
    except DeployError:
        return None


def deployed_figures(model: nn.Module, config: dict, cache_dir: str | Path, eval_images: int = 64) -> dict[str, Any]:
    """The OpenVINO report of a loaded variant, exported and measured once per weights and cached on disk.

    The cache key is the SHA-256 of the weights (verified when the variant was loaded) and the
    OpenVINO version; a cached report is returned without converting anything. ``model`` is
    traced: pass one that no other thread uses meanwhile (a copy of a shared model).
    """
    folder = cache_folder(config, cache_dir)
    with _CACHE_LOCK:  # one export at a time: each uses every core
        report = cached_report(config, cache_dir)
        if report is not None:
            return report
        partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        export_model(model, config, partial, images=held_out_images(config, eval_images))
        partial.replace(folder)  # the whole folder or none: an interrupted export leaves no report
        return read_report(folder)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures a reader compares across variants, from an ``openvino.json``.

    ``deployable_bytes`` is ``model.bin`` for dense variants and, for sparse ones, ``model.bin``
    deflated (a zip that unzips to the runnable IR); ``bitmask_bytes`` the bitmask encoding of
    the same weights (see :func:`sparse_storage`).
    """
    measured = report.get("measured", {})
    sparse = report.get("sparse_storage")
    ir_bytes = report["files"][IR_BIN]
    return {
        "variant": report["variant"],
        "stored_weights": "+".join(f"{k}x{v}" for k, v in sorted(report["weights"]["stored"].items())),
        "ir_bytes": ir_bytes,
        "deployable_bytes": sparse["deflate_bytes"] if sparse else ir_bytes,
        "bitmask_bytes": sparse["bitmask_bytes"] if sparse else None,
        "latency_ms": measured.get("latency_ms_batch1"),
        "throughput": measured.get("throughput_batch32"),
        "agreement_with_pytorch": measured.get("agreement_with_pytorch"),
        "machine": measured.get("machine"),
        "openvino_version": report["openvino_version"],
    }


def zoo_deployment(zoo: str | Path, cache_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per variant of ``zoo`` its deployed size and speed (:func:`summary`), for dose-response curves.

    Exports and measures each variant once (cached by weights hash under ``cache_dir``).

    Example:
        >>> figures = zoo_deployment("zoo/resnet18-shapes", ".cache")
        >>> figures["int8"]["deployable_bytes"] / figures["fp32"]["deployable_bytes"]
        0.25...
    """
    zoo = Path(zoo)
    out = {}
    for directory in sorted((d for d in zoo.iterdir() if (d / CONFIG_FILE).is_file()),
                            key=lambda d: parse_variant(d.name).order):
        model, config = load_variant(directory)
        out[directory.name] = summary(deployed_figures(model, config, cache_dir))
    return out
