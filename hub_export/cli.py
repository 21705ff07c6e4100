"""``python -m hub_export``: ``push`` one variant or ``push-zoo`` all variants of a family;
``openvino`` / ``openvino-zoo`` export them to OpenVINO IR (:mod:`hub_export.openvino`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import HFValidationError, HfHubHTTPError

from hub_export import openvino
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
        s.add_argument("--with-openvino", action="store_true",
                       help=f"also upload the OpenVINO IR (and its measured figures) in {openvino.SUBFOLDER}/")
    _add_openvino_commands(sub)
    return p


def _add_openvino_commands(sub: argparse._SubParsersAction) -> None:
    one = sub.add_parser("openvino", help="export one variant to OpenVINO IR (model.xml, model.bin, openvino.json)")
    one.add_argument("checkpoint", type=Path, help="a variant directory (config.json + model.safetensors)")
    zoo = sub.add_parser("openvino-zoo", help="export every variant of a zoo to OpenVINO IR, one folder each")
    zoo.add_argument("zoo", type=Path, help="a zoo directory as written by `python -m training zoo`")
    for s in (one, zoo):
        s.add_argument("--out", type=Path, required=True, help="output directory")
        s.add_argument("--no-measure", action="store_true",
                       help="only convert: no latency, throughput or agreement measurement")
        s.add_argument("--eval-images", type=int, default=openvino.DEFAULT_EVAL_IMAGES,
                       help="held-out images for the agreement with the PyTorch variant (default: %(default)s)")


def _openvino_main(args: argparse.Namespace) -> int:
    """Export one variant or a zoo; logs what each IR stores and what it measured."""
    options = {"measure_speed": not args.no_measure, "eval_images": args.eval_images}
    if args.command == "openvino":
        reports = {args.checkpoint.name: openvino.export(args.checkpoint, args.out, **options)}
    else:
        reports = openvino.export_zoo(args.zoo, args.out, **options)
    for name, report in reports.items():
        figures = openvino.summary(report)
        logger.info("%s: weights stored as %s, model.bin %.2f MB, deployable %.2f MB, latency %s ms, "
                    "%s images/s, agreement with PyTorch %s", name, figures["stored_weights"],
                    figures["ir_bytes"] / 1e6, figures["deployable_bytes"] / 1e6,
                    _fmt(figures["latency_ms"]), _fmt(figures["throughput"]), _fmt(figures["agreement_with_pytorch"]))
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("openvino", "openvino-zoo"):
            return _openvino_main(args)
        if args.command == "push":
            uploads = [(args.checkpoint, args.repo_id, args.base_model)]
        else:
            uploads = [(u.checkpoint, u.repo_id, u.base_model) for u in zoo_uploads(args.zoo, args.org)]
        for checkpoint, repo_id, base_model in uploads:
            if args.dry_run is not None:
                out = args.dry_run if args.command == "push" else args.dry_run / repo_id.split("/")[-1]
                stage(checkpoint, repo_id, out, base_model, with_openvino=args.with_openvino)
            else:
                push(checkpoint, repo_id, private=args.private, revision=args.revision, base_model=base_model,
                     with_openvino=args.with_openvino)
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
