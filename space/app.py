"""Start the Space: find the models, warm the caches, serve the page.

``python app.py`` with no arguments pulls the default Hub repos, falls back to a local zoo,
and on a machine with neither builds the zoos here (see :mod:`space.zoo_source`): first what the
first page needs (``mobilenetv2-imagenet``: torchvision's pretrained FP32, which needs no
training, and INT8 derived from it), then, while the page is served, the rest in the background
(:mod:`space.background`): that family's other variants, then the ``resnet18-shapes`` and
``resnet18-fashionmnist`` zoos (the whole ladder with ``--ladder``), each variant and each family
joining the page when it is ready.
Until the first models are ready, the address serves a page with the live progress
(:mod:`space.preparing`), which turns into the Space when it is up. Flags override the
``SURGERY_*`` environment variables:

    python app.py --zoo /data/zoo --source local --port 7860

Example (in a test, without blocking):
    >>> demo, launch = create_app(["--zoo", "zoo", "--source", "local"])
    >>> demo.launch(prevent_thread_lock=True, quiet=True, **launch)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path

if importlib.util.find_spec("gradio") is None:  # `pip install compressed-cnn-surgery` without the extra
    raise ModuleNotFoundError("the Space needs Gradio: pip install \"compressed-cnn-surgery[space]\" "
                              "(or -r requirements.txt)", name="gradio")

import gradio as gr  # noqa: E402

from space.background import BackgroundBuild
from space.examples import write_examples
from space.preparing import StartupLog, preparing_page
from space.session import DEFAULT_STEPS, Session
from space.ui import CSS, build_demo
from space.zoo_source import SOURCES, BuildOptions, SourceConfig, SourceError, resolve
from surgery.devices import ENV as DEVICE_ENV, faithful, resolve_device
from surgery.images import MAX_FILE_BYTES

logger = logging.getLogger("space")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--hub-org", help="Hub organisation of the repos ORG/<family>-<variant> "
                                     "(env SURGERY_HUB_ORG)")
    p.add_argument("--revision", help="Hub revision to pull (env SURGERY_HUB_REVISION)")
    p.add_argument("--families", help="comma-separated families to show (env SURGERY_FAMILIES)")
    p.add_argument("--zoo", help="local zoo directory, and where a built zoo goes (env SURGERY_ZOO; default zoo)")
    p.add_argument("--source", choices=SOURCES, help="auto: Hub, else local zoo, else build (env SURGERY_SOURCE)")
    p.add_argument("--cache-dir", default=os.environ.get("SURGERY_SPACE_CACHE",
                                                         str(Path.home() / ".cache" / "surgery-space")),
                   help="examples and precomputed results (env SURGERY_SPACE_CACHE)")
    p.add_argument("--concurrency", type=int, default=int(os.environ.get("SURGERY_SPACE_CONCURRENCY", "2")),
                   help="requests served at once per action (env SURGERY_SPACE_CONCURRENCY)")
    p.add_argument("--feature-steps", type=int,
                   default=int(os.environ.get("SURGERY_SPACE_FEATURE_STEPS", str(DEFAULT_STEPS))),
                   help="activation-maximisation steps of the Features tab's first view, computed at start-up "
                        "(env SURGERY_SPACE_FEATURE_STEPS)")
    p.add_argument("--build-steps", type=int,
                   default=int(os.environ.get("SURGERY_BUILD_STEPS", "0")) or None,
                   help="when the zoo is built here, cap every training epoch at this many steps: a quick "
                        "smoke build whose models are barely trained (env SURGERY_BUILD_STEPS)")
    p.add_argument("--device", default=os.environ.get(DEVICE_ENV, "auto"),
                   help="where models run: auto (a CUDA GPU when present, else the CPU), cpu, cuda, cuda:N "
                        f"(env {DEVICE_ENV})")
    p.add_argument("--serve-after", default=os.environ.get("SURGERY_SERVE_AFTER"),
                   help="when the zoo is built here, the variants trained before the page is served; the rest "
                        "trains in the background (env SURGERY_SERVE_AFTER; default fp32, and fp32,int8-ptq for a "
                        "family whose FP32 is pretrained)")
    p.add_argument("--ladder", action="store_true", default=os.environ.get("SURGERY_LADDER", "") not in ("", "0"),
                   help="when the zoo is built here, also train the whole compression ladder in the background "
                        "(env SURGERY_LADDER=1)")
    p.add_argument("--host", default=None, help="address to listen on (Gradio's default, or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="port (Gradio's default, or GRADIO_SERVER_PORT)")
    return p


def create_app(argv: list[str] | None = None) -> tuple[gr.Blocks, dict]:
    """Resolve the models, warm the caches and build the page; returns it and its launch options."""
    return _create(parser().parse_args(argv))


def _create(args: argparse.Namespace) -> tuple[gr.Blocks, dict]:
    config = SourceConfig.from_env(hub_org=args.hub_org, families=args.families, zoo=args.zoo,
                                   source=args.source, revision=args.revision)
    serve_after = tuple(v.strip() for v in args.serve_after.split(",") if v.strip()) if args.serve_after else None
    build = BuildOptions(steps=args.build_steps, ladder=args.ladder, serve_after=serve_after)
    cache = Path(args.cache_dir)
    device = resolve_device(args.device)  # before any model loads: a bad --device fails at once
    faithful(device)
    session = Session(resolve(config, build), cache_dir=cache, device=device)
    previous = None  # one build at a time: the served families' rest first, then the coming families
    for family, zoo in [*session.families.items(), *session.coming.items()]:
        if zoo.pending:
            previous = session.builds[family] = BackgroundBuild(session, family, zoo.directory, list(zoo.pending),
                                                                steps=args.build_steps, after=previous).start()
    first = next(iter(session.families))
    logger.info("precomputing the Features tab's first view for %s", first)
    session.precompute(first, args.feature_steps)
    examples = write_examples(cache / "examples", [*session.families, *session.coming])
    demo = build_demo(session, examples, concurrency=args.concurrency, feature_steps=args.feature_steps,
                      study_root=cache / "study")
    launch = {"server_name": args.host, "server_port": args.port, "max_file_size": MAX_FILE_BYTES,
              "allowed_paths": [str(cache)], "footer_links": ["api"], "css": CSS}
    return demo, launch


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    log = StartupLog.attach()
    waiting = preparing_page(log)
    waiting.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True)
    logger.info("preparing the models; progress at %s", waiting.local_url)
    try:
        demo, launch = _create(args)
    except (SourceError, ValueError) as exc:  # no models anywhere, or a bad flag value
        logger.error("%s", exc)
        raise SystemExit(2) from None
    finally:
        waiting.close()
        log.detach()
    demo.launch(**{**launch, "server_port": waiting.server_port})
