"""The Space's page: Blocks layout and event wiring. Everything it computes comes from ``surgery``.

Each tab's action has a stable API name for ``gradio_client``:

- ``/explain`` (image, family, saliency method): per variant FP32 | INT8 | sparse90 the top-5,
  a GradCAM overlay and a saliency map, then a table of each compressed variant against FP32;
- ``/features`` (family, layer, channels, steps): activation-maximisation images per variant;
- ``/representations`` (family): CKA heatmaps layer x layer and a short reading;
- ``/models`` (family): accuracy, agreement, sparsity, size, source and loading code per variant,
  and its OpenVINO size and speed on this machine (:mod:`space.deployment`);
- ``/model_view`` (image, family): the image as the family's models read it (cropped, resized,
  gray for gray families); ``/examples`` (family): the family's examples (:mod:`space.examples`).

Bad input never reaches a traceback: every handler turns ``ValueError`` (``ImageError`` included)
into a ``gr.Error`` with its message, and anything unexpected into a short message while the
details go to the server log.

Example:
    >>> demo = build_demo(session, examples=write_examples(Path("/tmp/examples"), session.families))
    >>> demo.launch(css=CSS)
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from space import deployment, render
from space.examples import Example
from space.session import (DEFAULT_CHANNELS, DEFAULT_STEPS, MAX_CHANNELS, MAX_STEPS, MIN_STEPS,
                           SALIENCY_METHODS, TOP_K, Session)
from space.zoo_source import CONTROL, VARIANTS
from surgery.images import MAX_FILE_BYTES, decode_image, model_view, to_tensor
from surgery.registry import get_family

logger = logging.getLogger(__name__)

DISPLAY = 256  # height of the image boxes in the page, in CSS pixels
# Maps are stored at the model's input size, but at least 128 pixels (for the photo under the
# GradCAM overlay) and at most DISPLAY: more pixels than the model saw add no information and
# cost PNG encoding time on every request (bench/bench_app.py).
MIN_MAP_SIDE = 128
# The maps fill their boxes (the browser scales them up smoothly); pass as ``launch(css=CSS)``.
CSS = ".map img { width: 100%; height: 100%; object-fit: contain; }"
MAPS_FOLDER = "surgery-maps"  # inside Gradio's cache folder
TITLES = {"fp32": "FP32", "int8": "INT8 (NNCF QAT)", "sparse90": "90% sparse", CONTROL: "FP32, seed 1"}
COMPARISON_HEADERS = ["variant", "same prediction as FP32", "GradCAM Spearman", "GradCAM top-k IoU",
                      "saliency Spearman", "saliency top-k IoU"]
MODEL_HEADERS = ["variant", "top-1", "agreement with FP32", "weight sparsity", "file size (MB)", "source"]


def _guard(action: str) -> Callable:
    """Handler decorator: a clear message in the page for bad input, never a traceback."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except ValueError as exc:  # ImageError and every validation error of the session
                raise gr.Error(str(exc), title=f"{action}: bad input") from None
            except Exception:
                logger.exception("%s failed", action)
                raise gr.Error(f"{action} failed on the server; the details are in its log. "
                               "Other requests are not affected.", title=f"{action} failed") from None
        return wrapper
    return decorate


def _image_source(payload: Any) -> tuple[bytes | str, str]:
    """What ``decode_image`` reads from an unprocessed ``gr.Image`` value, and the name to show."""
    if not payload:
        raise ValueError("no image: upload one or pick an example first")
    if isinstance(payload, str):
        return payload, Path(payload).name
    name = payload.get("orig_name") or "the uploaded image"
    url = payload.get("url") or ""
    if url.startswith("data:"):
        encoded = url.partition(",")[2]
        if len(encoded) > MAX_FILE_BYTES * 4 // 3 + 4:
            raise ValueError(f"{name}: larger than the {MAX_FILE_BYTES / 2**20:.0f} MiB limit")
        try:
            return base64.b64decode(encoded, validate=True), name
        except ValueError:
            raise ValueError(f"{name}: the data URL is not valid base64") from None
    if not payload.get("path"):
        raise ValueError(f"{name}: the upload carries no file")
    return payload["path"], name


def _top_k(probabilities, class_names: list[str]) -> dict[str, float]:
    values, indices = probabilities.topk(min(TOP_K, len(class_names)))
    return {class_names[i]: round(float(v), 6) for v, i in zip(values, indices)}


def _number(value: float) -> float | None:
    return None if value is None or value != value else round(float(value), 4)


def _parse_channels(text: str) -> list[int]:
    try:
        channels = [int(part) for part in str(text).replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"channels must be whole numbers separated by commas, got {text!r}") from None
    return list(dict.fromkeys(channels))  # drop repeats, keep order


def _png_file(pixels: np.ndarray, directory: Path) -> str:
    """Save an RGB map as a lossless PNG at zlib level 1 in ``directory``; returns its path.

    Gradio would encode arrays at Pillow's default level, 4x slower for files 12% smaller: for
    the six maps of an Explain answer that was the largest cost after the models themselves
    (``bench/bench_app.py``). Files are named by content, so a repeated answer is not encoded
    again and two requests writing the same map agree.
    """
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes() + str(pixels.shape).encode()).hexdigest()
    path = directory / f"{digest[:40]}.png"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f"{digest[:40]}.{threading.get_ident()}.partial"
        Image.fromarray(pixels).save(partial, "PNG", compress_level=1)
        partial.replace(path)
    return str(path)


class Handlers:
    """The event handlers, bound to one shared :class:`Session`.

    ``maps_dir`` is where the Explain maps are written: inside Gradio's cache folder, Gradio
    serves them as they are.
    """

    def __init__(self, session: Session, maps_dir: Path) -> None:
        self.session = session
        self.maps_dir = Path(maps_dir)
        self.deployment = deployment.DeploymentColumns(session)

    def _family(self, family: str) -> str:
        self.session.zoo(family)  # raises ValueError for a family that is not loaded
        return family

    @_guard("Explain")
    def explain(self, image: Any, family: str, method: str) -> list:
        family = self._family(family)
        source, name = _image_source(image)
        fam = get_family(family)
        side = min(max(fam.input_size, MIN_MAP_SIDE), DISPLAY)
        picture = decode_image(source, name, draft_size=side)
        x = to_tensor(model_view(picture, fam.input_size, fam.grayscale))
        shown = np.asarray(model_view(picture, side, fam.grayscale))
        result = self.session.explain(family, x, method)
        class_names = self.session.zoo(family).variants["fp32"].config["class_names"]
        outputs: list = []
        for variant in VARIANTS:
            answer = result.variants[variant]
            outputs += [_top_k(answer.probabilities, class_names),
                        _png_file(render.overlay(shown, answer.gradcam), self.maps_dir),
                        _png_file(render.colorize(answer.saliency, side), self.maps_dir)]
        rows = [[TITLES[c.variant], "yes" if c.same_prediction else "no", _number(c.gradcam_spearman),
                 _number(c.gradcam_iou), _number(c.saliency_spearman), _number(c.saliency_iou)]
                for c in result.comparisons]
        return outputs + [rows]

    @_guard("Model view")
    def model_view(self, image: Any, family: str) -> str | None:
        """The image at the family's input size, as its models read it (None before any image)."""
        if not image:
            return None
        fam = get_family(self._family(family))
        source, name = _image_source(image)
        picture = decode_image(source, name, draft_size=fam.input_size)
        return _png_file(np.asarray(model_view(picture, fam.input_size, fam.grayscale)), self.maps_dir)

    @_guard("Features")
    def features(self, family: str, layer: str, channels: str, steps: float,
                 progress: gr.Progress = gr.Progress()) -> list:
        family = self._family(family)
        wanted = _parse_channels(channels)
        images = self.session.features(family, layer, wanted, int(steps),
                                       progress=lambda done, text: progress(done, desc=text))
        return [[(str(path), f"{layer} channel {c}") for path, c in zip(images[v], wanted)] for v in VARIANTS]

    @_guard("Representations")
    def representations(self, family: str) -> tuple[list, str]:
        family = self._family(family)
        comparison = self.session.representations(family)
        gallery = [(render.heatmap_figure(sim.values, list(sim.layers_a), list(sim.layers_b), TITLES["fp32"],
                                          TITLES[other], f"linear CKA (debiased): FP32 vs {TITLES[other]}"),
                    f"FP32 vs {TITLES[other]}")
                   for other, sim in comparison.pairs.items()]
        return gallery, comparison.reading

    @_guard("Models")
    def models(self, family: str) -> tuple[list, str]:
        family = self._family(family)
        zoo = self.session.zoo(family)
        rows, code = [], []
        for name, variant in zoo.variants.items():
            metrics = variant.config.get("metrics", {})
            link = (f"[{variant.repo_id}](https://huggingface.co/{variant.repo_id})" if variant.repo_id
                    else f"local: `{variant.location}`")
            rows.append([TITLES.get(name, name), _number(metrics.get("top1")),
                         _number(metrics.get("agreement_with_fp32")),
                         _number(self.session.sparsity(family, name)),
                         round(variant.config["weights"]["bytes"] / 1e6, 2), link])
            code.append(f'{name.replace("-", "_")} = load_variant("{variant.repo_id or variant.location}")')
        snippet = ("```python\nfrom surgery import load_variant\n\n" + "\n".join(code)
                   + "\nmodel, config = fp32  # each is (model in eval mode, its config.json)\n```")
        deployed, note = self.deployment.cells(family)  # OpenVINO size and speed (space/deployment.py)
        rows = [row + deployed[name] for row, name in zip(rows, zoo.variants)]
        return rows, f"Models of **{family}**, from {zoo.origin}. {note}\n\n{snippet}"


def _source_banner(session: Session) -> str:
    lines = [f"- **{family}**: {zoo.origin}" for family, zoo in session.families.items()]
    return "**Models shown here come from:**\n" + "\n".join(lines)


def _examples_update(examples: dict[str, list[Example]]) -> Callable[[str], gr.Dataset]:
    def family_examples(family: str) -> gr.Dataset:
        """The example images of the selected family, labelled (true class, or the photo's name)."""
        shown = examples.get(family, [])
        return gr.Dataset(samples=[[str(e.path)] for e in shown], sample_labels=[e.label for e in shown])

    return family_examples


def build_demo(session: Session, examples: dict[str, list[Example]], concurrency: int = 2,
               feature_steps: int = DEFAULT_STEPS) -> gr.Blocks:
    """The page. ``examples``: each family's example images (shown for the selected family);
    ``concurrency``: requests served at once per action (locks keep models apart);
    ``feature_steps``: the Features tab's initial optimisation steps (precomputed at start-up)."""
    families = list(session.families)
    first = families[0]
    first_layer = get_family(first).gradcam_layer
    with gr.Blocks(title="Compressed CNN surgery") as demo:
        h = Handlers(session, Path(demo.GRADIO_CACHE) / MAPS_FOLDER)
        gr.Markdown("# Compressed CNN surgery\nWhat changes inside a CNN when it is quantized to INT8 "
                    "(NNCF quantization-aware training) or made 90% sparse: the same image, the same "
                    "tools, three models side by side.")
        gr.Markdown(_source_banner(session), elem_id="source")

        with gr.Tab("Explain"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                     height=DISPLAY, elem_id="explain-image")
                    family = gr.Dropdown(families, value=first, label="Model family")
                    method = gr.Radio(list(SALIENCY_METHODS), value="gradient", label="Saliency method")
                    run = gr.Button("Explain", variant="primary", elem_id="explain-button")
                    view = gr.Image(label="What the model sees", type="filepath", height=DISPLAY // 2,
                                    interactive=False, elem_id="model-view", elem_classes=["map"])
                with gr.Column(scale=2):
                    shown = examples.get(first, [])
                    gallery = gr.Examples([[str(e.path)] for e in shown], inputs=[image], label="Examples",
                                          example_labels=[e.label for e in shown], cache_examples=False,
                                          examples_per_page=12)
                    gr.Markdown("Each model is explained for its own top prediction: GradCAM on the last "
                                "stage, saliency as the input gradient (or SmoothGrad / integrated "
                                "gradients). The table compares each compressed model's maps with FP32's: "
                                "Spearman rank correlation, and overlap (IoU) of the top 10% of pixels.")
            outputs = []
            with gr.Row(equal_height=True):
                for variant in VARIANTS:
                    with gr.Column(elem_classes=["variant-column"], elem_id=f"column-{variant}"):
                        gr.Markdown(f"### {TITLES[variant]}")
                        outputs += [gr.Label(num_top_classes=TOP_K, label=f"{TITLES[variant]}: top-{TOP_K}"),
                                    gr.Image(label=f"{TITLES[variant]}: GradCAM", type="filepath",
                                             height=DISPLAY, elem_classes=["map"]),
                                    gr.Image(label=f"{TITLES[variant]}: saliency", type="filepath",
                                             height=DISPLAY, elem_classes=["map"])]
            table = gr.Dataframe(headers=COMPARISON_HEADERS, label="How each compressed model differs from FP32",
                                 interactive=False)
            run.click(h.explain, [image, family, method], outputs + [table], api_name="explain",
                      preprocess=False, concurrency_limit=concurrency)
            family.change(_examples_update(examples), family, gallery.dataset, api_name="examples")
            gr.on([image.change, family.change], h.model_view, [image, family], view, api_name="model_view",
                  preprocess=False)

        with gr.Tab("Features"):
            gr.Markdown("Activation maximisation: the input each model's channel responds to most, "
                        f"optimised from the same start for every variant (at most {MAX_CHANNELS} "
                        f"channels and {MAX_STEPS} steps).")
            with gr.Row():
                f_family = gr.Dropdown(families, value=first, label="Model family")
                layer = gr.Dropdown(session.layers(first), value=first_layer, label="Layer")
                channels = gr.Textbox(", ".join(map(str, DEFAULT_CHANNELS)), label="Channels")
                steps = gr.Slider(MIN_STEPS, MAX_STEPS, value=feature_steps, step=8, label="Steps")
            f_run = gr.Button("Visualise", variant="primary")
            with gr.Row():
                galleries = [gr.Gallery(label=TITLES[v], columns=2, height="auto", format="png") for v in VARIANTS]
            f_family.change(lambda f: gr.Dropdown(choices=session.layers(f), value=get_family(f).gradcam_layer),
                            f_family, layer, api_visibility="private")
            f_run.click(h.features, [f_family, layer, channels, steps], galleries, api_name="features",
                        concurrency_limit=1)
            # The default channels were computed at start-up: they appear with the page.
            demo.load(h.features, [f_family, layer, channels, steps], galleries, api_visibility="private")

        with gr.Tab("Representations"):
            gr.Markdown("Linear CKA (Kornblith et al. 2019) between every layer of FP32 and every layer "
                        "of the other model, on a fixed reference image set. A bright diagonal means the "
                        "two models build the same representations stage by stage.")
            r_family = gr.Dropdown(families, value=first, label="Model family")
            r_run = gr.Button("Compare representations", variant="primary")
            heatmaps = gr.Gallery(label="CKA, layer x layer", columns=3, height="auto", format="png",
                                  object_fit="contain")
            reading = gr.Markdown()
            r_run.click(h.representations, r_family, [heatmaps, reading], api_name="representations",
                        concurrency_limit=concurrency)

        with gr.Tab("Models"):
            m_family = gr.Dropdown(families, value=first, label="Model family")
            m_table = gr.Dataframe(headers=MODEL_HEADERS + deployment.HEADERS,
                                   datatype=["str", "number", "number", "number", "number", "markdown",
                                             *deployment.DATATYPES],
                                   interactive=False, label="Variants")
            m_code = gr.Markdown()
            m_family.change(h.models, m_family, [m_table, m_code], api_name="models")
            demo.load(h.models, m_family, [m_table, m_code], api_visibility="private")
    return demo
