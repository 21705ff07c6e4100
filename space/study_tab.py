"""The Space's "Study" tab: precomputed compression-study results, found by the zoo's weight hashes.

The study runs offline (``python -m study --zoo DIR --cache-root ROOT``) and writes
``ROOT/<hash of the zoo's weights>/`` (``metrics.json``, ``figures/*.png``). The tab reads that
directory for the zoo the Space serves: when any weights change, the hash changes and the tab
says that no study of these weights exists yet instead of showing stale numbers. No maths here.

Wiring (the integrator's, inside the app's ``gr.Blocks``):
    >>> with gr.Blocks() as demo:
    ...     add_study_tab(Path("study-cache"), {"resnet18-shapes": Path("zoo/resnet18-shapes")})
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from study.zoo import StudyZoo


@dataclass(frozen=True)
class StudyView:
    """What the tab shows of one study."""

    figures: list[tuple[str, str]]  # (png path, caption)
    reading: str  # markdown: first level worse than the band, per axis and metric
    class_header: list[str]
    class_rows: list[list[str]]


def study_directory(root: Path, zoo_dir: Path) -> Path:
    """Where the study of this zoo's current weights is cached."""
    return Path(root) / StudyZoo.open(zoo_dir).digest()


def load_study(directory: Path, class_names: list[str]) -> StudyView | None:
    """The tab's content from a study output directory, or None when there is none."""
    path = Path(directory) / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    figures = [(str(p), p.stem.replace("-", " ")) for p in sorted((Path(directory) / "figures").glob("dose-*.png"))]
    # A pretrained FP32 used as it is has no seeds: its note, and no "worse than" reading.
    if metrics.get("no_null"):
        return StudyView(figures, metrics["no_null"], *_class_table(metrics, class_names))
    check = metrics["null_check"]
    lines = [f"Rule: {metrics['rule']}."]
    if check["rate"] is not None:
        lines.append(f"On this zoo's own FP32 seeds (each judged against the others) it flagged {check['flagged']} "
                     f"of {check['cells']} cells ({check['rate']:.1%}).")
    for axis, dr in metrics["dose_response"].items():
        lines.append(f"**{axis}** ({', '.join(dr['levels'])}), first level worse than retraining:")
        for metric, r in dr["metrics"].items():
            title = metrics["metrics"][metric]["title"]
            lines.append(f"- {title}: {r['first_worse'] or 'no level'}")
    return StudyView(figures, "\n".join(lines) or "No compressed variants in this study.",
                     *_class_table(metrics, class_names))


def _class_table(metrics: dict, class_names: list[str]) -> tuple[list[str], list[list[str]]]:
    """The per-class damage table: its header and rows."""
    header = ["variant", "class", "FP32 recall", "recall", "change [95%]", "Holm p", "detectable drop", "hurt"]
    rows = []
    for name, entry in metrics["classes"].items():
        for r in entry["classes"]:
            if r["images"]:
                c = r["change"]
                drop = "" if r["detectable_drop"] is None else f"{r['detectable_drop']:.0%}"
                rows.append([name, class_names[r["class"]], f"{r['recall_fp32']:.3f}", f"{r['recall']:.3f}",
                             f"{c['value']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]",
                             "" if r["p_holm"] is None else f"{r['p_holm']:.3g}", drop,
                             "yes" if r.get("hurt_significantly") else ""])
    return header, rows


def study_view(root: Path, zoos: Mapping[str, Path], family: str):
    """The tab's outputs for ``family``: figures, reading, class-damage table."""
    try:
        zoo = StudyZoo.open(zoos[family])
    except FileNotFoundError:  # a family still being built here
        return [], f"{family} has no FP32 model yet: it is still being trained here.", gr.update(value=[])
    view = load_study(study_directory(root, zoos[family]), list(zoo.family.class_names))
    if view is None:
        message = (f"No study of these weights yet. Run `python -m study --zoo {zoos[family]} "
                   f"--cache-root {root}` to compute it.")
        return [], message, gr.update(value=[], headers=["variant", "class"])
    return view.figures, view.reading, gr.update(value=view.class_rows, headers=view.class_header)


def add_study_tab(root: Path, zoos: Mapping[str, Path]) -> None:
    """Add the "Study" tab to the enclosing ``gr.Blocks`` (one family selector, figures, tables)."""
    families = list(zoos)
    with gr.Tab("Study"):
        gr.Markdown("The compression study of this zoo: each metric against the compression level, with the band "
                    "of FP32 models trained with other seeds, and the classes compression hurts.")
        family = gr.Dropdown(families, value=families[0] if families else None, label="family")
        curves = gr.Gallery(label="dose-response", columns=1, height="auto")
        reading = gr.Markdown()
        table = gr.Dataframe(label="per-class damage", interactive=False)
        show = gr.Button("Show study")

        def update(name: str):
            return study_view(root, zoos, name)

        show.click(update, family, [curves, reading, table], api_name="study")
        family.change(update, family, [curves, reading, table], api_visibility="private")
