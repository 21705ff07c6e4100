"""The one checkpoint format, and its one loader.

A variant is a directory holding exactly two files:

- ``config.json``: family, variant, architecture, class names, compression parameters, NNCF and
  torch versions, training recipe, metrics, and the SHA-256 of the weights file;
- ``model.safetensors``: the state dict; for a quantized model its metadata also carries NNCF's
  ``get_config`` as JSON, which ``nncf.torch.load_from_config`` turns back into quantizers.

Kinds: ``fp32``, ``quantized`` (any bit widths: ``config["compression"]["quantizers"]`` records
every quantizer's role, layer and bit width, restored and checked on load) and ``sparse`` (target
and achieved sparsity, checked on load). Checkpoints of the former kind ``int8`` load as 8-bit
``quantized`` ones.

Nothing is unpickled and no code from a checkpoint runs, so loading an untrusted one is safe.
A pickled, truncated or tampered checkpoint raises :class:`CheckpointError` naming the file.

Example:
    >>> from surgery import load_variant
    >>> model, config = load_variant("zoo/resnet18-shapes/int4")   # or a Hub repo id
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
from surgery.architectures import build_from_architecture
from surgery.variants import parse_variant

logger = logging.getLogger(__name__)

FORMAT = "surgery-variant/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VARIANT_KINDS = ("fp32", "quantized", "sparse")
LEGACY_KINDS = {"int8": "quantized"}  # kinds of earlier checkpoints -> what they load as
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
    comp = dict(info.compression)
    if info.kind == "quantized":
        comp["quantizers"] = _quantizer_record(model, info.architecture)
    tensors = state_tensors(model)
    weights = directory / WEIGHTS_FILE
    safetensors.torch.save_file(tensors, weights, metadata=metadata)
    config = {
        "format": FORMAT,
        "family": info.family,
        "variant": info.variant,
        "kind": info.kind,
        "architecture": info.architecture,
        "class_names": list(info.class_names),
        "compression": comp,
        "nncf_version": compression.NNCF_VERSION,
        "torch_version": torch.__version__,
        "recipe": info.recipe,
        "metrics": info.metrics,
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights), "bytes": weights.stat().st_size},
    }
    write_config(directory, config)
    logger.info("saved %s/%s to %s", info.family, info.variant, directory)
    return directory


def _alias_key(t: torch.Tensor) -> tuple | None:
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors stores it: on the CPU, contiguous, and each tensor once. A
    module registered under two names (NNCF shares one quantizer between the inputs of a residual
    add) appears in the state dict twice with one storage; only its first name (sorted) is kept,
    and :func:`fill_aliases` restores the others on load."""
    tensors, seen = {}, set()
    for name, t in sorted(model.state_dict().items()):
        key = _alias_key(t)
        if key is not None and key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().cpu().contiguous()
    return {k: tensors[k] for k in model.state_dict() if k in tensors}


def fill_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` completed with the names that share a tensor in ``model`` (see :func:`state_tensors`)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in model.state_dict().items():
        key = _alias_key(t)
        if key is not None:
            groups.setdefault(key, []).append(name)
    filled = dict(state)
    for names in groups.values():
        present = [n for n in names if n in state]
        for n in names:
            if present and n not in filled:
                filled[n] = state[present[0]]
    return filled


def _quantizer_record(model: nn.Module, architecture: dict) -> dict[str, dict]:
    """Every quantizer by NNCF hook name: weight or activation, the layer it serves, bit width."""
    size = int(architecture["input_size"])
    device = next(model.parameters()).device
    roles = compression.quantizer_roles(model, torch.zeros(1, 3, size, size, device=device))
    widths = compression.bit_widths(model)
    return {name: {"role": role.kind, "layer": role.layer, "first_or_last": role.edge, "bits": widths[name]}
            for name, role in roles.items()}


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
    if config["kind"] in LEGACY_KINDS:
        config = _upgrade_legacy(config)
    if config["kind"] not in VARIANT_KINDS:
        raise CheckpointError(f"{path}: unknown variant kind {config['kind']!r}")
    return config


def _upgrade_legacy(config: dict) -> dict:
    """A kind ``int8`` config (before bit widths were recorded) as the 8-bit ``quantized`` kind."""
    comp = config.get("compression") if isinstance(config.get("compression"), dict) else {}
    return {**config, "kind": LEGACY_KINDS[config["kind"]],
            "compression": {**comp, "weight_bits": 8, "activation_bits": 8, "first_last_bits": 8,
                            "legacy_kind": config["kind"]}}


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
    if (nncf_config is not None) != (config["kind"] == "quantized"):
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: NNCF config presence does not match kind "
                              f"{config['kind']!r}")
    if nncf_config is not None:
        try:
            model = compression.restore(model, nncf_config)
        except Exception as exc:  # NNCF raises many types for a malformed config
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: cannot restore NNCF modules ({exc})") from None
    try:
        model.load_state_dict(fill_aliases(model, state), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:3]
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: weights do not fit the architecture: "
                              f"{' '.join(first)}") from None
    if config["kind"] == "quantized":
        _check_bit_widths(model, config, directory)
    if config["kind"] == "sparse":
        _check_sparsity(model, config, directory)
    return Variant(move(model, resolve_device(device)).eval(), config)


def _check_bit_widths(model: nn.Module, config: dict, directory: Path) -> None:
    """Settle the restored quantizers' levels on their loaded widths, and refuse a checkpoint whose
    config records other widths than its weights and NNCF config hold."""
    where = directory / CONFIG_FILE
    try:
        widths = compression.settle_bit_widths(model)
    except ValueError as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: {exc}") from None
    comp = config.get("compression") if isinstance(config.get("compression"), dict) else {}
    if comp.get("legacy_kind"):
        odd = {n: b for n, b in widths.items() if b != 8}
        if odd:
            raise CheckpointError(f"{where}: kind {comp['legacy_kind']!r} but quantizers at other widths: {odd}")
        return
    recorded = comp.get("quantizers")
    if not isinstance(recorded, dict) or not all(isinstance(r, dict) and "bits" in r for r in recorded.values()):
        raise CheckpointError(f"{where}: a quantized checkpoint must record every quantizer's bit width")
    recorded_bits = {n: r["bits"] for n, r in recorded.items()}
    if recorded_bits != widths:
        diff = sorted(n for n in set(recorded_bits) | set(widths) if recorded_bits.get(n) != widths.get(n))
        raise CheckpointError(f"{where}: recorded bit widths disagree with the restored model at {diff[0]} "
                              f"(recorded {recorded_bits.get(diff[0])}, restored {widths.get(diff[0])}"
                              f"{f', and {len(diff) - 1} more' if len(diff) > 1 else ''})")
    for name, r in recorded.items():
        expected = comp.get("first_last_bits") if r.get("first_or_last") else \
            comp.get("weight_bits" if r.get("role") == "weight" else "activation_bits")
        if expected != r["bits"]:
            raise CheckpointError(f"{where}: quantizer {name} ({r.get('role')}) has {r['bits']} bits, "
                                  f"the variant's widths say {expected}")
    try:
        spec = parse_variant(config["variant"])
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if (spec.kind, spec.weight_bits, spec.activation_bits) != ("quantized", comp.get("weight_bits"),
                                                               comp.get("activation_bits")):
        raise CheckpointError(f"{where}: variant {config['variant']!r} does not match the recorded widths "
                              f"W{comp.get('weight_bits')}A{comp.get('activation_bits')}")


def _check_sparsity(model: nn.Module, config: dict, directory: Path) -> None:
    """The achieved sparsity recorded (where it is) is the one the weights have."""
    comp = config.get("compression") if isinstance(config.get("compression"), dict) else {}
    recorded = comp.get("achieved_sparsity")
    if recorded is None:  # checkpoints from before it was recorded
        return
    actual = compression.weight_sparsity(model)["overall"]
    if not isinstance(recorded, (int, float)) or abs(actual - recorded) > 1e-9:
        raise CheckpointError(f"{directory / CONFIG_FILE}: records {recorded!r} sparsity, "
                              f"the weights have {actual:.6f}")
