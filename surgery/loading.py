"""``load_variant``: the one entry point that turns a local directory or a Hub repo id into a model."""

from __future__ import annotations

from pathlib import Path

import torch

from surgery.checkpoint import Variant, load_local


def load_variant(source: str | Path, revision: str | None = None,
                 device: str | torch.device = "cpu") -> Variant:
    """Load a variant from a checkpoint directory or a Hugging Face Hub repo id (``ORG/NAME``).

    Returns ``(model, config)``: the model in eval mode on ``device`` (``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or ``"auto"``: see :func:`surgery.devices.resolve_device`) and its ``config.json``.
    Hub repos are downloaded with ``snapshot_download`` into the usual cache (only the two files
    of the format); nothing is unpickled and no code from the repo runs.

    Example:
        >>> model, config = load_variant("zoo/resnet18-shapes/int8")
        >>> model, config = load_variant("my-org/resnet18-shapes-int8", revision="main", device="auto")
    """
    path = Path(source)
    if path.exists() or revision is None and not _looks_like_repo_id(str(source)):
        return load_local(path, device)
    from surgery import hub  # imported lazily: huggingface_hub reads HF_ENDPOINT at import

    return load_local(hub.download(str(source), revision=revision), device)


def _looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))
