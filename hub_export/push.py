"""Push variants to the Hugging Face Hub: one model repo per variant, with its model card.

A push uploads exactly :data:`UPLOAD_FILES`: the two files of the checkpoint format, checked first
(config, SHA-256 and safetensors metadata), and ``README.md`` from :func:`hub_export.card.model_card`.
:func:`stage` writes that folder; a dry run stops there, a push uploads it with
``create_repo(exist_ok=True)`` and ``upload_folder``. The token comes from where ``huggingface_hub``
looks for it (``HF_TOKEN``, ``hf auth login``). ``with_openvino`` adds the variant's OpenVINO IR
(:func:`hub_export.openvino.export`) in the subfolder ``openvino/``, and the card its measured
figures; ``surgery.load_variant`` still downloads only the checkpoint's two files. Those figures
are measured anew by every stage, so with the IR a dry run and a push differ in them.

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

import httpx2
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from hub_export import openvino
from hub_export.card import model_card
from surgery.checkpoint import CONFIG_FILE, FILES, CheckpointError, read_config, read_weights
from surgery.variants import parse_variant, seed_name, sort_key

logger = logging.getLogger(__name__)

README = "README.md"
UPLOAD_FILES = (*FILES, README)
FP32_VARIANT = "fp32"  # the zoo directory the compressed variants are derived from


class PushError(ValueError):
    """A push that cannot be made (no token, bad organisation, Hub refused or unreachable).

    A ``ValueError``, so command-line tools report it as one message (exit status 2).
    """


@dataclass(frozen=True)
class Upload:
    """One variant of a zoo and the repo it goes to."""

    checkpoint: Path
    repo_id: str
    base_model: str | None


def stage(checkpoint: str | Path, repo_id: str, out: str | Path, base_model: str | None = None,
          with_openvino: bool = False) -> Path:
    """Write the folder that a push of ``checkpoint`` to ``repo_id`` uploads; returns it.

    Raises :class:`~surgery.checkpoint.CheckpointError` if the checkpoint is not valid, or if
    ``out`` holds files other than those a push would upload; ``HFValidationError`` for a bad repo id.
    """
    validate_repo_id(repo_id)  # a dry run fails where the push would
    checkpoint, out = Path(checkpoint), Path(out)
    config = read_config(checkpoint)
    read_weights(checkpoint, config)  # refuse to publish a truncated or tampered checkpoint
    out.mkdir(parents=True, exist_ok=True)
    allowed = (*UPLOAD_FILES, openvino.SUBFOLDER) if with_openvino else UPLOAD_FILES
    strays = sorted(p.name for p in out.iterdir() if p.name not in allowed)
    if strays:
        raise CheckpointError(f"{out}: holds {', '.join(strays)}; stage into an empty directory")
    for name in FILES:
        shutil.copyfile(checkpoint / name, out / name)
    deployment = openvino.export(checkpoint, out / openvino.SUBFOLDER) if with_openvino else None
    model_card(config, repo_id, base_model, deployment=deployment).save(out / README)
    logger.info("staged %s for %s in %s", checkpoint, repo_id, out)
    return out


def push(checkpoint: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         base_model: str | None = None, with_openvino: bool = False) -> str:
    """Create ``repo_id`` if needed and upload the variant to ``revision`` (default branch if None).

    Returns the URL of the commit. ``private`` applies when the repo is created.
    """
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="hub_export-") as tmp:
        folder = stage(checkpoint, repo_id, tmp, base_model, with_openvino)
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


def push_zoo(zoo: str | Path, org: str, *, private: bool = False, revision: str | None = None,
             with_openvino: bool = False) -> list[str]:
    """Push every variant of ``zoo`` (see :func:`zoo_uploads`); returns the commit URLs."""
    return [push(u.checkpoint, u.repo_id, private=private, revision=revision, base_model=u.base_model,
                 with_openvino=with_openvino)
            for u in zoo_uploads(zoo, org)]


def check_can_push(org: str, family: str) -> None:
    """Fail before any work when a later push to ``ORG/<family>-...`` certainly cannot happen.

    Checks the repo id's form and that a token is configured (``HF_TOKEN`` or ``hf auth login``);
    whether the token may write to ``org`` only the Hub can tell, at the first push.
    """
    try:
        validate_repo_id(f"{org}/{family}-{FP32_VARIANT}")
    except HFValidationError as exc:
        raise PushError(f"--push-to-hub {org!r}: not a valid Hub user or organisation name ({exc})") from None
    if get_token() is None:
        raise PushError(f"--push-to-hub {org}: no Hub token found; set HF_TOKEN or run `hf auth login` "
                        "with a token that may write to it")


def push_variant(zoo: str | Path, name: str, org: str, *, private: bool = False,
                 revision: str | None = None) -> str:
    """Push the variant directory ``ZOO/NAME`` to ``ORG/<family>-<variant>`` with its card, as
    :func:`push_zoo` would push it (a compressed variant names the zoo's FP32 repo as base model).

    What ``python -m training zoo --push-to-hub ORG`` calls after each variant is built and
    evaluated. Returns the commit URL; raises :class:`PushError` with one clear message.

    Example:
        >>> push_variant("zoo/resnet18-shapes", "int8", "my-org")   # my-org/resnet18-shapes-int8
    """
    upload = next((u for u in zoo_uploads(zoo, org) if u.checkpoint.name == name), None)
    if upload is None:
        raise CheckpointError(f"{Path(zoo) / name}: no variant directory (with {CONFIG_FILE}) to push")
    try:
        return push(upload.checkpoint, upload.repo_id, private=private, revision=revision,
                    base_model=upload.base_model)
    except HFValidationError as exc:
        raise PushError(f"push of {upload.checkpoint} to {upload.repo_id}: {exc}") from None
    except HfHubHTTPError as exc:
        denied = exc.response.status_code in (401, 403)
        hint = "; a write token comes from HF_TOKEN or `hf auth login`" if denied else ""
        raise PushError(f"push of {upload.checkpoint} to {upload.repo_id} on {constants.ENDPOINT} failed: "
                        f"{exc}{hint}") from None
    except httpx2.TransportError as exc:
        raise PushError(f"push of {upload.checkpoint} to {upload.repo_id}: cannot reach the Hub at "
                        f"{constants.ENDPOINT} ({exc}); check the network or HF_ENDPOINT") from None
