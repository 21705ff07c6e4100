"""Resume state after each epoch: model, optimizer and position, as safetensors plus JSON.

Like the checkpoint format, nothing here is pickled. The state is only valid for the same
stage and recipe; a mismatch starts the stage afresh rather than mixing two runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from surgery.checkpoint import fill_aliases, state_tensors

logger = logging.getLogger(__name__)

STATE_FILE = "resume.safetensors"


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, key: dict) -> None:
    """Record that ``epoch`` epochs are done; ``key`` identifies the run (stage, recipe, seed)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in state_tensors(model).items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = float(value)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"epoch": epoch, "key": key, "param_groups": opt["param_groups"], "scalars": scalars}
    tmp = directory / (STATE_FILE + ".tmp")
    safetensors.torch.save_file(tensors, tmp, metadata={"resume": json.dumps(meta)})
    tmp.replace(directory / STATE_FILE)  # atomic: an interrupted save never leaves half a state


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, key: dict) -> int:
    """Restore the state if one for this ``key`` exists; returns the number of epochs done."""
    path = directory / STATE_FILE
    if not path.exists():
        return 0
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["resume"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        logger.warning("ignoring unreadable resume state %s (%s)", path, exc)
        return 0
    if meta["key"] != key:
        logger.warning("resume state in %s belongs to another run; starting afresh", directory)
        return 0
    model.load_state_dict(fill_aliases(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}))
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update({n: torch.tensor(x) for n, x in values.items()})
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    logger.info("resumed from %s after epoch %d", path, meta["epoch"])
    return int(meta["epoch"])


def clear(directory: Path) -> None:
    (directory / STATE_FILE).unlink(missing_ok=True)
