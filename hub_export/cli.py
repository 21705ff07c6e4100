"""``python -m hub_export``: ``push`` one variant or ``push-zoo`` all variants of a family."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import HFValidationError, HfHubHTTPError

from hub_export.push import push, stage, zoo_uploads
from surgery.checkpoint import CheckpointError

logger = logging.getLogger("hub_export")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hub_export",
                                description="Push model-zoo variants to the Hugging Face Hub, with model cards.")
    sub = p.add_subparsers(dest="command", required=True)
    one = sub.add_parser("push", help="push one variant directory to ORG/NAME")
    one.add_argument("checkpoint", type=Path, help="a variant directory (config.json + model.safetensors)")
    one.add_argument("--repo-id", required=True, help="ORG/NAME")
    one.add_argument("--base-model", help="the repo this variant was derived from (its FP32 repo)")
    zoo = sub.add_parser("push-zoo", help="push every variant of a zoo to ORG/<family>-<variant>")
    zoo.add_argument("zoo", type=Path, help="a zoo directory as written by `python -m training zoo`")
    zoo.add_argument("--org", required=True, help="user or organisation that owns the repos")
    for s in (one, zoo):
        s.add_argument("--private", action="store_true", help="create missing repos as private")
        s.add_argument("--revision", help="branch to push to (created if missing); default: main")
        s.add_argument("--dry-run", type=Path, metavar="DIR",
                       help="write what would be uploaded under DIR instead of pushing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "push":
            uploads = [(args.checkpoint, args.repo_id, args.base_model)]
        else:
            uploads = [(u.checkpoint, u.repo_id, u.base_model) for u in zoo_uploads(args.zoo, args.org)]
        for checkpoint, repo_id, base_model in uploads:
            if args.dry_run is not None:
                out = args.dry_run if args.command == "push" else args.dry_run / repo_id.split("/")[-1]
                stage(checkpoint, repo_id, out, base_model)
            else:
                push(checkpoint, repo_id, private=args.private, revision=args.revision, base_model=base_model)
    except CheckpointError as exc:
        logger.error("%s", exc)
        return 2
    except HFValidationError as exc:
        logger.error("%s", exc)
        return 2
    except HfHubHTTPError as exc:
        denied = exc.response.status_code in (401, 403)
        hint = " A write token comes from HF_TOKEN or `hf auth login`." if denied else ""
        logger.error("push to %s failed: %s%s", constants.ENDPOINT, exc, hint)
        return 1
    except httpx2.TransportError as exc:
        logger.error("cannot reach the Hub at %s (%s); check the network or HF_ENDPOINT", constants.ENDPOINT, exc)
        return 1
    return 0
