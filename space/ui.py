"""The Space's page: Blocks layout and event wiring. Everything it computes comes from ``surgery``.

The visitor chooses which variants stand side by side (up to four). The page has a fixed four
column slots per tab; a request fills the first ones in display order and hides the others,
so one set of components serves any choice. Each tab's action has a stable API name for
``gradio_client`` (``variants``: a list of variant names such as ``["fp32", "int8", "int4"]``):

- ``/explain`` (image, family, saliency method, variants): per column its title, top-5, GradCAM
  overlay and saliency map (4 x 4 values; unused columns give ``""`` and ``None``), then a table
  of each chosen variant other than FP32 against FP32;
- ``/features`` (family, layer, channels, steps, variants): per column its title and the
  activation-maximisation images (4 x 2 values);
- ``/representations`` (family, variants): CKA heatmaps layer x layer of FP32 against each
  chosen variant and the seed controls (the reference band), and a short reading;
- ``/models`` (family): accuracy, agreement, sparsity, size, source and loading code per variant,
  and its OpenVINO size and speed on this machine (:mod:`space.deployment`);
- ``/model_view`` (image, family): the image as the family's models read it (cropped, resized,
  gray for gray families); ``/examples`` (family): the family's examples (:mod:`space.examples`).

Variants trained in the background (:mod:`space.background`) join the choices while the page is
open: a timer shows what is still training and refreshes the choices when a variant arrives.

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
from space.session import (DEFAULT_CHANNELS, DEFAULT_STEPS, MAX_CHANNELS, MAX_COLUMNS, MAX_STEPS, MIN_STEPS,
                           SALIENCY_METHODS, TOP_K, Session, default_columns)
from space.study_tab import add_study_tab
from space.zoo_source import REQUIRED
from surgery.images import MAX_FILE_BYTES, decode_image, model_view, to_tensor
from surgery.registry import get_family
from surgery.variants import parse_variant, sort_variants

logger = logging.getLogger(__name__)

DISPLAY = 256  # height of the image boxes in the page, in CSS pixels
# Maps are stored at the model's input size, but at least 128 pixels (for the photo under the
# GradCAM overlay) and at most DISPLAY: more pixels than the model saw add no information and
# cost PNG encoding time on every request (bench/bench_app.py).
MIN_MAP_SIDE = 128
# The maps fill their boxes (the browser scales them up smoothly); pass as ``launch(css=CSS)``.
CSS = ".map img { width: 100%; height: 100%; object-fit: contain; }"
MAPS_FOLDER = "surgery-maps"  # inside Gradio's cache folder
COLUMN_MIN_WIDTH = 200  # four columns side by side on a laptop screen
REFRESH_SECONDS = 3.0  # how often an open page asks whether a background variant has arrived
COMPARISON_HEADERS = ["variant", "same prediction as FP32", "GradCAM Spearman", "GradCAM top-k IoU",
                      "saliency Spearman", "saliency top-k IoU"]
MODEL_HEADERS = ["variant", "top-1", "agreement with FP32", "weight sparsity", "file size (MB)", "source"]
FAMILY_PICKERS = 4  # the family dropdowns of Explain, Features, Representations and Models


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


def title(name: str) -> str:
    """How the page names a variant (from :mod:`surgery.variants`)."""
    return parse_variant(name).title


def _choices(names: list[str]) -> list[tuple[str, str]]:
    return [(title(v), v) for v in names]


def _columns(chosen: list[str]) -> list:
    """Show the first ``len(chosen)`` column slots, hide the rest (not part of the API's values)."""
    return [gr.Column(visible=i < len(chosen)) for i in range(MAX_COLUMNS)]


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
    def explain(self, image: Any, family: str, method: str, variants: list[str] | None = None) -> list:
        family = self._family(family)
        chosen = self.session.check_variants(family, self.session.default_columns(family)
                                             if variants is None else variants)
        source, name = _image_source(image)
        fam = get_family(family)
        side = min(max(fam.input_size, MIN_MAP_SIDE), DISPLAY)
        picture = decode_image(source, name, draft_size=side)
        x = to_tensor(model_view(picture, fam.input_size, fam.grayscale))
        shown = np.asarray(model_view(picture, side, fam.grayscale))
        result = self.session.explain(family, x, method, chosen)
        class_names = self.session.zoo(family).variants[REQUIRED].config["class_names"]
        slots: list = []
        for variant, answer in result.variants.items():
            slots += [f"### {title(variant)}", _top_k(answer.probabilities, class_names),
                      _png_file(render.overlay(shown, answer.gradcam), self.maps_dir),
                      _png_file(render.colorize(answer.saliency, side), self.maps_dir)]
        slots += ["", None, None, None] * (MAX_COLUMNS - len(result.variants))
        rows = [[title(c.variant), "yes" if c.same_prediction else "no", _number(c.gradcam_spearman),
                 _number(c.gradcam_iou), _number(c.saliency_spearman), _number(c.saliency_iou)]
                for c in result.comparisons]
        return _columns(chosen) + slots + [rows]

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
    def features(self, family: str, layer: str, channels: str, steps: float, variants: list[str] | None = None,
                 progress: gr.Progress = gr.Progress()) -> list:
        family = self._family(family)
        wanted = _parse_channels(channels)
        images = self.session.features(family, layer, wanted, int(steps),
                                       progress=lambda done, text: progress(done, desc=text), variants=variants)
        slots: list = []
        for variant, paths in images.items():
            slots += [f"### {title(variant)}", [(str(path), f"{layer} channel {c}") for path, c in zip(paths, wanted)]]
        slots += ["", None] * (MAX_COLUMNS - len(images))
        return _columns(list(images)) + slots

    @_guard("Representations")
    def representations(self, family: str, variants: list[str] | None = None) -> tuple[list, str]:
        family = self._family(family)
        comparison = self.session.representations(family, variants)
        controls = set(self.session.controls(family))
        gallery = []
        for other, sim in comparison.pairs.items():
            caption = f"FP32 vs {title(other)}" + (" (control)" if other in controls else "")
            gallery.append((render.heatmap_figure(sim.values, list(sim.layers_a), list(sim.layers_b), "FP32",
                                                  title(other), f"linear CKA (debiased): {caption}"), caption))
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
            rows.append([title(name), _number(metrics.get("top1")),
                         _number(metrics.get("agreement_with_fp32")),
                         _number(self.session.sparsity(family, name)),
                         round(variant.config["weights"]["bytes"] / 1e6, 2), link])
            code.append(f'{name.replace("-", "_")} = load_variant("{variant.repo_id or variant.location}")')
        snippet = ("```python\nfrom surgery import load_variant\n\n" + "\n".join(code)
                   + "\nmodel, config = fp32  # each is (model in eval mode, its config.json)\n```")
        deployed, note = self.deployment.cells(family)  # OpenVINO size and speed (space/deployment.py)
        rows = [row + deployed[name] for row, name in zip(rows, zoo.variants)]
        training = f"\n\nStill training here: {', '.join(zoo.pending)}." if zoo.pending else ""
        return rows, f"Models of **{family}**, from {zoo.origin}. {note}{training}\n\n{snippet}"

    def training_status(self) -> str:
        """What is still training in the background, one line per family (empty when nothing is)."""
        return "\n\n".join(t for t in (b.status_text() for b in self.session.builds.values()) if t)

    def refresh(self, seen: dict, models_family: str, *pickers: str | list, force: bool = False) -> list:
        """The timer's tick (and page load, with ``force``): the status line, the family choices
        of the four tabs when a family built in the background arrived, the variant choices of
        each (family, chosen variants) pair in ``pickers`` (the visitor's choice kept unless it is
        still the default, which then grows with the zoo), the Models table when a variant
        arrived, and the timer itself (stopped once nothing trains)."""
        status = self.training_status()
        current = {f: self.session.variant_names(f) for f in self.session.families}
        changed = current != seen
        arrived = set(current) != set(seen) or force
        families = [gr.Dropdown(choices=list(current)) if arrived else gr.skip() for _ in range(FAMILY_PICKERS)]
        # The page's own choices are every family's variants, those still training included (so
        # that the API accepts any of them, with a clear message); on load, narrow them to the
        # family's ready ones.
        updates: list = []
        for family, value in zip(pickers[0::2], pickers[1::2]):
            if family not in current or not (changed or force):
                updates.append(gr.skip())
            elif not changed:  # choices only: a box the visitor ticked meanwhile stays ticked
                updates.append(gr.CheckboxGroup(choices=_choices(current[family])))
            else:
                keep = value is not None and sorted(value) != sorted(default_columns(seen.get(family, [])))
                updates.append(gr.CheckboxGroup(choices=_choices(current[family]),
                                                value=value if keep else default_columns(current[family])))
        models = self.models(models_family) if changed and models_family in current else (gr.skip(), gr.skip())
        return [gr.Markdown(status, visible=bool(status)), current, *families, *updates, *models,
                gr.Timer(active=any(b.pending for b in self.session.builds.values()))]

    def pick_family(self, family: str) -> gr.CheckboxGroup:
        """A tab's family changed: its variants, with the default columns chosen."""
        names = self.session.variant_names(family)
        return gr.CheckboxGroup(choices=_choices(names), value=default_columns(names))


def _all_variants(session: Session) -> list[str]:
    """Every variant any family has or is training: what a request may name (the choices each
    visitor sees are narrowed to the ready ones of the chosen family)."""
    zoos = [*session.families.values(), *session.coming.values()]
    return sort_variants({v for zoo in zoos for v in (*zoo.variants, *zoo.pending)})


def _variant_picker(session: Session, family: str, elem_id: str) -> gr.CheckboxGroup:
    return gr.CheckboxGroup(_choices(_all_variants(session)), value=session.default_columns(family),
                            label=f"Variants side by side (up to {MAX_COLUMNS})", elem_id=elem_id)


def _source_banner(session: Session) -> str:
    lines = [f"- **{family}**: {zoo.origin}" for family, zoo in [*session.families.items(), *session.coming.items()]]
    return "**Models shown here come from:**\n" + "\n".join(lines)


def _examples_update(examples: dict[str, list[Example]]) -> Callable[[str], gr.Dataset]:
    def family_examples(family: str) -> gr.Dataset:
        """The example images of the selected family, labelled (true class, or the photo's name)."""
        shown = examples.get(family, [])
        return gr.Dataset(samples=[[str(e.path)] for e in shown], sample_labels=[e.label for e in shown])

    return family_examples


def _slot_title(i: int, chosen: list[str]) -> str:
    return f"### {title(chosen[i])}" if i < len(chosen) else ""


def build_demo(session: Session, examples: dict[str, list[Example]], concurrency: int = 2,
               feature_steps: int = DEFAULT_STEPS, study_root: Path | None = None) -> gr.Blocks:
    """The page. ``examples``: each family's example images (shown for the selected family);
    ``study_root``: where ``python -m study --cache-root`` wrote its results (the Study tab);
    ``concurrency``: requests served at once per action (locks keep models apart);
    ``feature_steps``: the Features tab's initial optimisation steps (precomputed at start-up)."""
    first = next(iter(session.families))
    # Families still being built are among the choices too, so that requests naming them get the
    # session's clear message; each page narrows its choices to the served ones when it loads.
    families = [*session.families, *session.coming]
    first_layer = session.default_layer(first)
    shown = session.default_columns(first)
    with gr.Blocks(title="Compressed CNN surgery") as demo:
        h = Handlers(session, Path(demo.GRADIO_CACHE) / MAPS_FOLDER)
        gr.Markdown("# Compressed CNN surgery\nWhat changes inside a CNN when it is quantized (NNCF "
                    "quantization-aware training, 8 bits or fewer) or made sparse: the same image, the "
                    f"same tools, up to {MAX_COLUMNS} models side by side.")
        gr.Markdown(_source_banner(session), elem_id="source")
        status_text = h.training_status()
        status = gr.Markdown(status_text, visible=bool(status_text), elem_id="training-status")
        seen = gr.State({f: session.variant_names(f) for f in session.families})

        with gr.Tab("Explain"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                     height=DISPLAY, elem_id="explain-image")
                    view = gr.Image(label="What the model sees", type="filepath", height=DISPLAY // 2,
                                    interactive=False, elem_id="model-view", elem_classes=["map"])
                    family = gr.Dropdown(families, value=first, label="Model family")
                    variants = _variant_picker(session, first, "explain-variants")
                    method = gr.Radio(list(SALIENCY_METHODS), value="gradient", label="Saliency method")
                    run = gr.Button("Explain", variant="primary", elem_id="explain-button")
                with gr.Column(scale=2):
                    first_examples = examples.get(first, [])
                    gallery = gr.Examples([[str(e.path)] for e in first_examples], inputs=[image],
                                          label="Examples", example_labels=[e.label for e in first_examples],
                                          cache_examples=False,
                                          examples_per_page=12)
                    gr.Markdown("Each model is explained for its own top prediction: GradCAM on the last "
                                "stage, saliency as the input gradient (or SmoothGrad / integrated "
                                "gradients). The table compares each other model's maps with FP32's: "
                                "Spearman rank correlation, and overlap (IoU) of the top 10% of pixels.")
            columns, slots = [], []
            with gr.Row(equal_height=True):
                for i in range(MAX_COLUMNS):
                    with gr.Column(visible=i < len(shown), elem_classes=["variant-column"],
                                   elem_id=f"column-{i}", min_width=COLUMN_MIN_WIDTH) as column:
                        slots += [gr.Markdown(_slot_title(i, shown), elem_classes=["column-title"]),
                                  gr.Label(num_top_classes=TOP_K, label=f"top-{TOP_K}"),
                                  gr.Image(label="GradCAM", type="filepath", height=DISPLAY, elem_classes=["map"]),
                                  gr.Image(label="saliency", type="filepath", height=DISPLAY, elem_classes=["map"])]
                    columns.append(column)
            table = gr.Dataframe(headers=COMPARISON_HEADERS, label="How each model differs from FP32",
                                 interactive=False)
            run.click(h.explain, [image, family, method, variants], columns + slots + [table], api_name="explain",
                      preprocess=False, concurrency_limit=concurrency)
            family.change(_examples_update(examples), family, gallery.dataset, api_name="examples")
            gr.on([image.change, family.change], h.model_view, [image, family], view, api_name="model_view",
                  preprocess=False)
            family.change(h.pick_family, family, variants, api_visibility="private", queue=False)

        with gr.Tab("Features"):
            gr.Markdown("Activation maximisation: the input each model's channel responds to most, "
                        f"optimised from the same start for every variant (at most {MAX_CHANNELS} "
                        f"channels and {MAX_STEPS} steps).")
            with gr.Row():
                f_family = gr.Dropdown(families, value=first, label="Model family")
                layer = gr.Dropdown(session.layers(first), value=first_layer, label="Layer")
                channels = gr.Textbox(", ".join(map(str, DEFAULT_CHANNELS)), label="Channels")
                steps = gr.Slider(MIN_STEPS, MAX_STEPS, value=feature_steps, step=8, label="Steps")
            f_variants = _variant_picker(session, first, "features-variants")
            f_run = gr.Button("Visualise", variant="primary")
            f_columns, f_slots = [], []
            with gr.Row():
                for i in range(MAX_COLUMNS):
                    with gr.Column(visible=i < len(shown), elem_id=f"features-column-{i}",
                                   min_width=COLUMN_MIN_WIDTH) as column:
                        f_slots += [gr.Markdown(_slot_title(i, shown)),
                                    gr.Gallery(label="activation maximisation", columns=2, height="auto",
                                               format="png")]
                    f_columns.append(column)

            def on_family(f: str) -> tuple:
                return gr.Dropdown(choices=session.layers(f), value=session.default_layer(f)), h.pick_family(f)

            f_family.change(on_family, f_family, [layer, f_variants], api_visibility="private")
            f_inputs = [f_family, layer, channels, steps, f_variants]
            f_run.click(h.features, f_inputs, f_columns + f_slots, api_name="features", concurrency_limit=1)
            # The default channels were computed at start-up: they appear with the page.
            demo.load(h.features, f_inputs, f_columns + f_slots, api_visibility="private")

        with gr.Tab("Representations"):
            gr.Markdown("Linear CKA (Kornblith et al. 2019) between every layer of FP32 and every layer "
                        "of the other model, on a fixed reference image set. A bright diagonal means the "
                        "two models build the same representations stage by stage. FP32 against FP32 "
                        "trained again with another seed (the seed controls, always shown) is the "
                        "reference: how much two equally good networks differ.")
            with gr.Row():
                r_family = gr.Dropdown(families, value=first, label="Model family")
                r_variants = _variant_picker(session, first, "representations-variants")
            r_run = gr.Button("Compare representations", variant="primary")
            heatmaps = gr.Gallery(label="CKA, layer x layer", columns=3, height="auto", format="png",
                                  object_fit="contain")
            reading = gr.Markdown()
            r_run.click(h.representations, [r_family, r_variants], [heatmaps, reading], api_name="representations",
                        concurrency_limit=concurrency)
            r_family.change(h.pick_family, r_family, r_variants, api_visibility="private", queue=False)

        with gr.Tab("Models"):
            m_family = gr.Dropdown(families, value=first, label="Model family")
            m_table = gr.Dataframe(headers=MODEL_HEADERS + deployment.HEADERS,
                                   datatype=["str", "number", "number", "number", "number", "markdown",
                                             *deployment.DATATYPES],
                                   interactive=False, label="Variants")
            m_code = gr.Markdown()
            m_family.change(h.models, m_family, [m_table, m_code], api_name="models")
            demo.load(h.models, m_family, [m_table, m_code], api_visibility="private")

        local = {f: zoo.directory for f, zoo in [*session.families.items(), *session.coming.items()]
                 if zoo.directory is not None}
        if study_root is not None and local:
            add_study_tab(study_root, local)

        # Variants trained in the background join the choices: on page load, then every few
        # seconds while something trains (the timer stops itself after).
        timer = gr.Timer(REFRESH_SECONDS, active=any(b.pending for b in session.builds.values()))
        pickers = [family, variants, f_family, f_variants, r_family, r_variants]
        refresh_out = [status, seen, family, f_family, r_family, m_family, variants, f_variants, r_variants, m_table,
                       m_code, timer]
        timer.tick(h.refresh, [seen, m_family, *pickers], refresh_out, api_visibility="private", queue=False,
                   show_progress="hidden")
        demo.load(functools.partial(h.refresh, force=True), [seen, m_family, *pickers], refresh_out,
                  api_visibility="private", queue=False, show_progress="hidden")
    return demo
