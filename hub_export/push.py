"""Push variants to the Hugging Face Hub: one model repo per variant, with its model card.

A push uploads exactly :data:`UPLOAD_FILES`: the two files of the checkpoint format, checked first
(config, SHA-256 and safetensors metadata), and ``README.md`` from :func:`hub_export.card.model_card`.
:func:`stage` writes that folder; a dry run stops there, a push uploads it with
``create_repo(exist_ok=True)`` and ``upload_folder``. The token comes from where ``huggingface_hub``
looks for it (``HF_TOKEN``, ``hf auth login``).

Example:
    >>> stage("zoo/int8", "my-org/resnet18-shapes-int8", "dry-run/int8",
    ...       base_model="my-org/resnet18-shapes-fp32")          # inspect, then:
    >>> push("zoo/int8", "my-org/resnet18-shapes-int8", base_model="my-org/resnet18-shapes-fp32")
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import validate_repo_id

from hub_export.card import model_card
from surgery.checkpoint import CONFIG_FILE, FILES, CheckpointError, read_config, read_weights
from surgery.variants import parse_variant, seed_name, sort_key

logger = logging.getLogger(__name__)

README = "README.md"
UPLOAD_FILES = (*FILES, README)
FP32_VARIANT = "fp32"  # the zoo directory the compressed variants are derived from


@dataclass(frozen=True)
class Upload:
    """One variant of a zoo and the repo it goes to."""

    checkpoint: Path
    repo_id: str
    base_model: str | None


def stage(checkpoint: str | Path, repo_id: str, out: str | Path, base_model: str | None = None) -> Path:
    """Write the folder that a push of ``checkpoint`` to ``repo_id`` uploads; returns it.

    Raises :class:`~surgery.checkpoint.CheckpointError` if the checkpoint is not valid, or if
    ``out`` holds files other than those a push would upload; ``HFValidationError`` for a bad repo id.
    """
    validate_repo_id(repo_id)  # a dry run fails where the push would
    checkpoint, out = Path(checkpoint), Path(out)
    config = read_config(checkpoint)
    read_weights(checkpoint, config)  # refuse to publish a truncated or tampered checkpoint
    out.mkdir(parents=True, exist_ok=True)
    strays = sorted(p.name for p in out.iterdir() if p.name not in UPLOAD_FILES)
    if strays:
        raise CheckpointError(f"{out}: holds {', '.join(strays)}; stage into an empty directory")
    for name in FILES:
        shutil.copyfile(checkpoint / name, out / name)
    model_card(config, repo_id, base_model).save(out / README)
    logger.info("staged %s for %s in %s", checkpoint, repo_id, out)
    return out


def push(checkpoint: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         base_model: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload the variant to ``revision`` (default branch if None).

    Returns the URL of the commit. ``private`` applies when the repo is created.
    """
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="hub_export-") as tmp:
        folder = stage(checkpoint, repo_id, tmp, base_model)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                   commit_message=f"Upload variant {Path(checkpoint).name} with its model card")
    logger.info("pushed %s to %s: %s", checkpoint, repo_id, commit.commit_url)
    return commit.commit_url


def zoo_uploads(zoo: str | Path, org: str) -> list[Upload]:
    """Whatever variants the zoo in ``zoo`` holds (one directory each: ``fp32``, ``int4``,
    ``w4a8``, ``sparse95``, ``fp32-seed1``, ...) and their repos ``ORG/<family>-<variant>``, in the
    ladder's order (:func:`surgery.variants.sort_variants`).

    Compressed variants name the FP32 repo of their seed as their base model.
    """
    zoo = Path(zoo)
    if not zoo.is_dir():
        raise CheckpointError(f"{zoo}: no such zoo directory")
    configs = {d: read_config(d) for d in sorted(zoo.iterdir()) if (d / CONFIG_FILE).is_file()}
    if not configs:
        raise CheckpointError(f"{zoo}: no variant directories (with {CONFIG_FILE}) inside")
    families = {c["family"] for c in configs.values()}
    if len(families) > 1:
        raise CheckpointError(f"{zoo}: holds several families ({', '.join(sorted(families))}); "
                              "push one zoo at a time")
    family = families.pop()
    for d, c in configs.items():
        try:
            parse_variant(c["variant"])
        except ValueError as exc:
            raise CheckpointError(f"{d / CONFIG_FILE}: {exc}") from None
    present = {c["variant"] for c in configs.values()}

    def base_model(config: dict) -> str | None:
        if config["kind"] == "fp32":
            return None
        source = seed_name(FP32_VARIANT, parse_variant(config["variant"]).seed)
        if source not in present:
            logger.warning("%s has no %s variant: %s gets no base_model link", zoo, source, config["variant"])
            return None
        return f"{org}/{family}-{source}"

    ordered = sorted(configs.items(), key=lambda item: sort_key(item[1]["variant"]))
    return [Upload(d, f"{org}/{family}-{c['variant']}", base_model(c)) for d, c in ordered]


def push_zoo(zoo: str | Path, org: str, *, private: bool = False, revision: str | None = None) -> list[str]:
    """Push every variant of ``zoo`` (see :func:`zoo_uploads`); returns the commit URLs."""
    return [push(u.checkpoint, u.repo_id, private=private, revision=revision, base_model=u.base_model)
            for u in zoo_uploads(zoo, org)]
