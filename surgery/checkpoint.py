"""The one checkpoint format, and its one loader.

A variant is a directory holding exactly two files:

- ``config.json``: family, variant, architecture, class names, compression parameters, NNCF and
  torch versions, training recipe, metrics, and the SHA-256 of the weights file;
- ``model.safetensors``: the state dict; for an INT8 model its metadata also carries NNCF's
  ``get_config`` as JSON, which ``nncf.torch.load_from_config`` turns back into quantizers.

Nothing is unpickled and no code from a checkpoint runs, so loading an untrusted one is safe.
A pickled, truncated or tampered checkpoint raises :class:`CheckpointError` naming the file.

Example:
    >>> from surgery import load_variant
    >>> model, config = load_variant("zoo/resnet18-shapes/int8")   # or a Hub repo id
    >>> config["metrics"]["top1"]
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import safetensors
import safetensors.torch
import torch
from torch import nn

from surgery import compression
from surgery.devices import move, resolve_device
from surgery.registry import build_from_architecture

logger = logging.getLogger(__name__)

FORMAT = "surgery-variant/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VARIANT_KINDS = ("fp32", "int8", "sparse")
_NNCF_METADATA_KEY = "nncf_config"


class CheckpointError(ValueError):
    """A checkpoint that is missing, not in the project's format, corrupt or tampered with."""


class Variant(NamedTuple):
    """A loaded variant: the model (eval mode) and its ``config.json`` as a dict."""

    model: nn.Module
    config: dict[str, Any]


@dataclass(frozen=True)
class VariantInfo:
    """What ``save_variant`` records besides the weights."""

    family: str
    variant: str  # the directory name in a zoo: fp32, int8, sparse90, fp32-seed1, ...
    kind: str  # one of VARIANT_KINDS
    architecture: dict
    class_names: list[str]
    compression: dict
    recipe: dict
    metrics: dict


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_variant(model: nn.Module, directory: str | Path, info: VariantInfo) -> Path:
    """Write ``model`` and ``info`` in the checkpoint format; returns the directory."""
    if info.kind not in VARIANT_KINDS:
        raise ValueError(f"variant kind must be one of {VARIANT_KINDS}, got {info.kind!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT}
    nncf_config = compression.compression_config(model)
    if nncf_config is not None:
        metadata[_NNCF_METADATA_KEY] = json.dumps(nncf_config)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    safetensors.torch.save_file(tensors, weights, metadata=metadata)
    config = {
        "format": FORMAT,
        "family": info.family,
        "variant": info.variant,
        "kind": info.kind,
        "architecture": info.architecture,
        "class_names": list(info.class_names),
        "compression": info.compression,
        "nncf_version": compression.NNCF_VERSION,
        "torch_version": torch.__version__,
        "recipe": info.recipe,
        "metrics": info.metrics,
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights), "bytes": weights.stat().st_size},
    }
    write_config(directory, config)
    logger.info("saved %s/%s to %s", info.family, info.variant, directory)
    return directory


def write_config(directory: Path, config: dict) -> None:
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")


def read_config(directory: str | Path) -> dict[str, Any]:
    """Parse and check ``config.json`` of a checkpoint directory (weights not touched)."""
    directory = Path(directory)
    _refuse_foreign_files(directory)
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} config (format={_get(config, 'format')!r})")
    for key in ("family", "variant", "kind", "architecture", "weights"):
        if key not in config:
            raise CheckpointError(f"{path}: missing required key {key!r}")
    if config["kind"] not in VARIANT_KINDS:
        raise CheckpointError(f"{path}: unknown variant kind {config['kind']!r}")
    return config


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


def _refuse_foreign_files(directory: Path) -> None:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    weights = directory / WEIGHTS_FILE
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights.exists():
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise CheckpointError(f"{weights}: missing; a checkpoint stores its weights as safetensors{hint}")
    if not (directory / CONFIG_FILE).exists():
        raise CheckpointError(f"{directory / CONFIG_FILE}: missing")


def read_weights(directory: str | Path, config: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Verify and read ``model.safetensors``: returns the state dict and NNCF's config (or None)."""
    path = Path(directory) / WEIGHTS_FILE
    expected = _get(config["weights"], "sha256")
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: SHA-256 {actual[:12]}... does not match config.json ({str(expected)[:12]}...): "
            "the file is truncated, corrupt or was modified")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: safetensors metadata is not {FORMAT}")
    nncf_config = None
    if _NNCF_METADATA_KEY in metadata:
        try:
            nncf_config = json.loads(metadata[_NNCF_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: NNCF config in metadata is not JSON ({exc})") from None
    return state, nncf_config


def load_local(directory: str | Path, device: str | torch.device = "cpu") -> Variant:
    """Load a checkpoint directory onto ``device`` (``"auto"`` too, see :func:`surgery.devices.resolve_device`);
    see :func:`surgery.load_variant` for Hub repo ids."""
    directory = Path(directory)
    config = read_config(directory)
    state, nncf_config = read_weights(directory, config)
    try:
        model = build_from_architecture(config["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid architecture ({exc})") from None
    if (nncf_config is not None) != (config["kind"] == "int8"):
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: NNCF config presence does not match kind "
                              f"{config['kind']!r}")
    if nncf_config is not None:
        try:
            model = compression.restore(model, nncf_config)
        except Exception as exc:  # NNCF raises many types for a malformed config
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: cannot restore NNCF modules ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:3]
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: weights do not fit the architecture: "
                              f"{' '.join(first)}") from None
    return Variant(move(model, resolve_device(device)).eval(), config)
