"""The model card (README.md) of a variant's Hub repo, from its ``config.json``.

Built with ``huggingface_hub``'s ``ModelCardData`` and ``EvalResult``, so that the Hub indexes the
metadata: license, library, tags, dataset, ``base_model`` (a compressed variant points at its FP32
repo) and the metrics as ``model-index`` results (top-1, agreement with FP32, sparsity). The body
says how the variant was made, how to load it and what it is not. The text depends on nothing but
its arguments, so a dry run writes the very bytes that a push uploads.

Example:
    >>> from surgery import read_config
    >>> card = model_card(read_config("zoo/int8"), "my-org/resnet18-shapes-int8",
    ...                   base_model="my-org/resnet18-shapes-fp32")
    >>> card.data.base_model
    'my-org/resnet18-shapes-fp32'
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from surgery.architectures import get_architecture
from surgery.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from surgery.project import INSTALL_COMMAND, REPOSITORY
from surgery.registry import get_family
from surgery.variants import parse_variant

LICENSE = "apache-2.0"
LIBRARY_NAME = "pytorch"
# The family's dataset key -> (Hub dataset id or None, name, split the metrics were measured on).
DATASETS = {
    "cifar10": ("uoft-cs/cifar10", "CIFAR-10", "test"),
    "imagenet": ("ILSVRC/imagenet-1k", "ImageNet-1k", "validation"),
    "shapes": (None, "Generated shapes (surgery.data.shapes)", "test"),
    "fashion-mnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST", "test"),
}
_RELATION = {"quantized": "quantized", "sparse": "finetune"}  # the Hub's base_model_relation values
_METRICS = (  # config["metrics"] key, model-index type, name, format in the card's table
    ("top1", "accuracy", "Top-1 accuracy", "{:.2%}"),
    ("top5", "top_5_accuracy", "Top-5 accuracy", "{:.2%}"),
    ("agreement_with_fp32", "agreement", "Agreement with FP32 (identical top-1 predictions)", "{:.2%}"),
    ("top5_overlap_with_fp32", "top_5_overlap", "Top-5 overlap with FP32 (share of FP32's top 5 classes)", "{:.2%}"),
    ("kl_from_fp32", "kl_divergence", "KL divergence from FP32's outputs (nats, mean)", "{:.4f}"),
    ("sparsity", "sparsity", "Weight sparsity (exact zeros in conv and linear weights)", "{:.2%}"),
)


def model_card(config: dict[str, Any], repo_id: str, base_model: str | None = None,
               deployment: dict[str, Any] | None = None) -> ModelCard:
    """The card of the variant described by ``config`` when pushed to ``repo_id``.

    ``base_model`` is the repo the variant was derived from (the family's FP32 repo for a
    compressed variant), or None. ``deployment`` is the ``openvino.json`` of the IR uploaded with
    it (:func:`hub_export.openvino.export`), or None: then the card has no OpenVINO section.
    """
    family = get_family(config["family"])
    dataset_id, dataset_name, split = DATASETS[family.dataset]
    kind = config["kind"]
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        license=LICENSE,
        library_name=LIBRARY_NAME,
        pipeline_tag="image-classification",
        tags=["pytorch", "nncf", "image-classification", "safetensors", family.name, *compression_tags(config)],
        datasets=[dataset_id] if dataset_id else None,
        base_model=base_model,
        base_model_relation=_RELATION.get(kind) if base_model else None,
        eval_results=[
            EvalResult(task_type="image-classification", task_name="Image classification",
                       dataset_type=dataset_id or family.dataset, dataset_name=dataset_name,
                       dataset_split=split, metric_type=metric_type, metric_name=name,
                       metric_value=round(float(config["metrics"][key]), 4))
            for key, metric_type, name, _ in _METRICS if key in config.get("metrics", {})
        ],
    )
    body = "\n".join([
        _summary(config, repo_id, base_model, family.description, dataset_name),
        _results(config),
        _per_class(config),
        _dataset(family),
        *([_deployed_with_openvino(deployment, repo_id)] if deployment else []),
        _how_to_load(config, repo_id),
        _how_it_was_made(config, dataset_name, split),
        compression_section(config),
        _limitations(kind),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _summary(config: dict, repo_id: str, base_model: str | None, description: str, dataset: str) -> str:
    derived = f" Derived from [{base_model}](/{base_model})." if base_model else ""
    return (f"# {repo_id.split('/')[-1]}\n\n"
            f"Variant `{config['variant']}` of the `{config['family']}` family, trained on {dataset}: "
            f"{_what(config)}.{derived}\n\n{description}\n\n"
            "Part of *compressed CNN surgery*: FP32, quantized and sparse versions of the same CNN, to see what "
            "compression changes inside (attribution maps, features, representations).\n")


def _what(config: dict) -> str:
    if config["kind"] == "fp32":
        init = str(config.get("compression", {}).get("init") or "")
        if init.startswith("torchvision") and config.get("recipe", {}).get("epochs") == 0:
            other = " from an independent training run with another recipe" if parse_variant(
                config["variant"]).is_recipe_control else ""
            return (f"the full-precision (FP32) model: torchvision's pretrained {init.split()[-1]} weights{other}, "
                    "as they are (no seeds)")
        return f"the full-precision (FP32) model, seed {config.get('recipe', {}).get('seed')}"
    comp = config.get("compression", {})
    if config["kind"] == "quantized":
        refit = (", every layer's weights then refitted to FP32's outputs on calibration images and rounded onto "
                 "their grid with GPTQ's error compensation" if comp.get("reconstruction") else "")
        tuned = "distillation from FP32's outputs" if comp.get("distillation") else "quantization-aware fine-tuning"
        then = (f", then {tuned}" if comp.get("qat_steps", 1)
                else ", no fine-tuning" if refit else " only, no fine-tuning")
        return f"{_widths(comp)}, quantized with NNCF (calibration{refit}{then})"
    target = comp.get("target_sparsity")
    ratio = f" to {target:.0%} sparsity" if target is not None else ""
    refit = (", then every layer's kept weights refitted to FP32's outputs on calibration images"
             if comp.get("reconstruction") else "")
    return f"unstructured magnitude pruning with NNCF{ratio}{refit}, masks baked into the weights"


def _results(config: dict) -> str:
    metrics = config.get("metrics", {})
    rows = [f"| {name} | {form.format(float(metrics[key]))} |"
            for key, _, name, form in _METRICS if key in metrics]
    if "eval_samples" in metrics:
        rows.append(f"| Held-out images | {metrics['eval_samples']} |")
    return "## Results\n\n| Metric | Value |\n|---|---|\n" + "\n".join(rows) + "\n"


def _deployed_with_openvino(report: dict, repo_id: str) -> str:
    """The "Deployed with OpenVINO" section, from the ``openvino.json`` the export wrote."""
    folder = "openvino"  # hub_export.openvino.SUBFOLDER; the card module stays free of OpenVINO
    stored = report["weights"]["stored"]
    types = ", ".join(f"{kind} ({count} layers)" for kind, count in sorted(stored.items()))
    requested = report["weights"].get("requested_bits")
    narrower = (f" The variant's {requested}-bit weights are stored as 4-bit integers: OpenVINO has no "
                "narrower type." if requested is not None and requested < 4 else "")
    rows = [("Weights stored as (convolutions and the classifier)", types),
            ("`model.bin`", f"{report['files']['model.bin'] / 1e6:.2f} MB"),
            ("`model.safetensors` (PyTorch)", f"{report['source']['safetensors_bytes'] / 1e6:.2f} MB")]
    sparse = report.get("sparse_storage")
    if sparse:
        rows += [("`model.bin` deflated (zip)", f"{sparse['deflate_bytes'] / 1e6:.2f} MB"),
                 ("Bitmask + non-zero values", f"{sparse['bitmask_bytes'] / 1e6:.2f} MB")]
    measured = report.get("measured")
    if measured:
        rows += [("Latency, batch 1 (median)", f"{measured['latency_ms_batch1']:.2f} ms"),
                 ("Throughput, batch 32 (median)", f"{measured['throughput_batch32']:.1f} images/s")]
        if measured.get("agreement_with_pytorch") is not None:
            rows.append(("Same top-1 as the PyTorch model", f"{measured['agreement_with_pytorch']:.2%} of "
                         f"{measured['agreement_images']} held-out images"))
        rows.append(("Machine", f"{measured['machine']}; {measured['threads']} threads, "
                     f"{measured['inference_precision']} inference precision"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    size = report["input"]["shape"][-1]
    return (
        "## Deployed with OpenVINO\n\n"
        f"`{folder}/` holds this variant as OpenVINO {report['openvino_version']} IR (`model.xml`, "
        f"`model.bin`) and `openvino.json`, what its export stored and measured.{narrower}\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        "Run it with `openvino` alone (no PyTorch, no NNCF):\n\n"
        "```python\n"
        "import json\n\n"
        "import numpy as np\n"
        "import openvino as ov\n"
        "from huggingface_hub import snapshot_download\n\n"
        f'folder = snapshot_download("{repo_id}", allow_patterns=["{folder}/*"]) + "/{folder}"\n'
        'model = ov.Core().compile_model(f"{folder}/model.xml", "CPU")\n'
        'class_names = json.load(open(f"{folder}/openvino.json"))["class_names"]\n'
        f"images = np.random.rand(2, 3, {size}, {size}).astype(np.float32)  "
        "# RGB in [0, 1], NCHW; the model normalises inside\n"
        "logits = model(images)[0]\n"
        "print([class_names[i] for i in logits.argmax(axis=1)])\n"
        "```\n")
def _per_class(config: dict) -> str:
    per_class = config.get("metrics", {}).get("per_class_top1")
    if not per_class:
        return ""
    rows = [f"| {name} | {float(value):.2%} |" for name, value in per_class.items()]
    return "## Per-class accuracy\n\n| Class | Top-1 |\n|---|---|\n" + "\n".join(rows) + "\n"


def _dataset(family) -> str:
    """The data's source, licence, citation and a published result on it (from the registry)."""
    card = family.dataset_card
    if card is None:
        return ""
    return (f"## Dataset\n\n- [{card.name}]({card.url}); licence: {card.licence}.\n"
            f"- Cite: {card.citation}\n- For comparison: {card.anchor}\n")


def _how_to_load(config: dict, repo_id: str) -> str:
    """Install command first, then code that runs as it stands (``tests/test_install.py`` runs it)."""
    size = config["architecture"]["input_size"]
    return (
        "## How to load\n\n"
        "Install this project's package `surgery` (from its Git repository; it brings PyTorch, NNCF and the "
        "Hugging Face Hub client, not the demo app's Gradio):\n\n"
        "```bash\n"
        f"{INSTALL_COMMAND}\n"
        "```\n\n"
        "```python\n"
        "import torch\n"
        "import surgery\n\n"
        f'model, config = surgery.load_variant("{repo_id}")  # eval mode on the CPU; device="cuda" for a GPU\n'
        f"images = torch.rand(2, 3, {size}, {size})  # RGB in [0, 1]; the model normalises inside\n"
        "predictions = model(images).argmax(dim=1)\n"
        'print([config["class_names"][i] for i in predictions])\n'
        "```\n\n"
        f'With the package\'s dependencies installed, `torch.hub.load("{REPOSITORY}", "variant", '
        f'repo_id="{repo_id}")` returns the same `(model, config)`.\n\n'
        f"Only `{CONFIG_FILE}` and `{WEIGHTS_FILE}` are downloaded (into the usual Hugging Face cache; "
        "`HF_HUB_OFFLINE=1` then loads from it). No pickle is read and no code from the repo runs: the "
        "architecture is rebuilt from the config, the weights are checked against the SHA-256 it records, "
        "and a quantized model's NNCF quantizers (with their bit widths) are restored from JSON in the safetensors metadata.\n")


def _how_it_was_made(config: dict, dataset: str, split: str) -> str:
    arch = config["architecture"]
    parts = get_architecture(arch["arch"])
    lines = [
        "## How it was made\n",
        f"- Architecture: torchvision `{arch['arch']}`, {arch['num_classes']} classes, "
        f"{arch['input_size']}x{arch['input_size']} input; normalisation (mean {arch['mean']}, "
        f"std {arch['std']}) is part of the model. First convolution `{parts.first_conv}` and classifier "
        f"`{parts.classifier}` (kept at 8 bits in quantized variants); GradCAM reads `{parts.gradcam_layer}`.",
        f"- Data: {dataset}; metrics on its {split} split.",
        f"- NNCF {config.get('nncf_version')}, PyTorch {config.get('torch_version')}.",
    ]
    compression = {k: v for k, v in config.get("compression", {}).items() if v is not None and k != "quantizers"}
    if compression:
        lines.append("- Compression (calibration and fine-tuning): "
                     + "; ".join(f"{k} = {v}" for k, v in compression.items()) + ".")
    recipe = config.get("recipe", {})
    if recipe:
        lines.append("\nTraining recipe (for a compressed variant: its fine-tuning):\n")
        lines.append("| Setting | Value |\n|---|---|")
        lines.extend(f"| {k} | {v} |" for k, v in recipe.items())
    return "\n".join(lines) + "\n"


def _limitations(kind: str) -> str:
    lines = ["## Limitations\n"]
    lines.extend(compression_limitations(kind))
    lines.append("- A research artefact for studying compression, trained with a short recipe; "
                 "not meant for deployment.")
    return "\n".join(lines) + "\n"


# --- the compression ladder: bit widths and sparsity levels -------------------------------------

def _widths(comp: dict) -> str:
    w, a = comp.get("weight_bits", 8), comp.get("activation_bits", 8)
    edge = comp.get("first_last_bits", 8)
    kept = f" (first convolution and classifier at {edge} bits)" if min(w, a) < edge else ""
    return f"{w}-bit weights and {a}-bit activations{kept}"


def compression_tags(config: dict) -> list[str]:
    """Hub tags of the variant's compression: ``quantization``, ``int4`` / ``w4a8``, ``sparsity`` ..."""
    comp = config.get("compression", {})
    if config["kind"] == "quantized":
        w, a = comp.get("weight_bits", 8), comp.get("activation_bits", 8)
        return ["quantization", f"int{w}" if w == a else f"w{w}a{a}"]
    if config["kind"] == "sparse":
        return ["sparsity", "pruning"]
    return []


def compression_section(config: dict) -> str:
    """The card's "Compression" section: every quantizer's bit width, or the sparsity target and
    what the stored weights achieve; empty for FP32."""
    comp = config.get("compression", {})
    if config["kind"] == "quantized":
        activations = comp.get("activation_quantizers")  # absent from checkpoints that predate the choice
        schemes = "weights per-channel symmetric" + (f"; activations per-tensor {activations}" if activations else "")
        lines = ["## Compression: bit widths\n",
                 f"{_widths(comp)[0].upper()}{_widths(comp)[1:]}; {schemes}. "
                 "Quantizer ranges were calibrated on training images, then trained with the weights.\n"]
        quantizers = comp.get("quantizers")
        if isinstance(quantizers, dict):
            lines.append("| Quantizer (NNCF hook) | Role | Layer | Bits |\n|---|---|---|---|")
            lines.extend(f"| `{name}` | {q.get('role')} | {q.get('layer') or '-'} | {q.get('bits')} |"
                         for name, q in quantizers.items())
        else:
            lines.append("Every quantizer at 8 bits (a checkpoint from before bit widths were recorded per quantizer).")
        return "\n".join(lines) + "\n"
    if config["kind"] == "sparse":
        target, achieved = comp.get("target_sparsity"), comp.get("achieved_sparsity",
                                                               config.get("metrics", {}).get("sparsity"))
        rows = [f"| Target | {target:.2%} |" if target is not None else None,
                f"| Achieved (exact zeros in the stored conv and linear weights) | {achieved:.2%} |"
                if achieved is not None else None]
        return ("## Compression: sparsity\n\n| Sparsity | Fraction of weights |\n|---|---|\n"
                + "\n".join(r for r in rows if r) + "\n")
    return ""


def compression_limitations(kind: str) -> list[str]:
    """What the variant's compression is not."""
    if kind == "quantized":
        return ["- The quantization is NNCF's *simulated* quantization in PyTorch: fake-quantize operations "
                "round weights and activations to their bit widths' levels but compute in float32. It is not "
                "a deployed integer kernel: the file is not smaller (weights are stored in float32), it runs "
                "no faster and uses no less memory than FP32, and an integer runtime (e.g. OpenVINO after "
                "conversion) may differ slightly. Below 8 bits, NNCF's hardware presets do not cover these "
                "widths (3 bits nowhere, 2 only for depthwise convolutions): they were set per quantizer."]
    if kind == "sparse":
        return ["- The zeros are stored in dense tensors: the file is no smaller and inference no "
                "faster unless a sparse runtime or compression is used."]
    return []
