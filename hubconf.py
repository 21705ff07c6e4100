"""``torch.hub`` entry point: a variant of the model zoo by its Hugging Face Hub repo id.

    model, config = torch.hub.load("compressed-cnn-surgery/compressed-cnn-surgery", "variant",
                                   repo_id="compressed-cnn-surgery/resnet18-shapes-int8")

torch.hub fetches this repository's code and calls :func:`variant`, which is
:func:`surgery.load_variant`: only ``config.json`` and ``model.safetensors`` come from the model
repo; no pickle is read and no code from the model repo runs. ``source="local"`` takes a checkout.
"""

dependencies = ["torch", "torchvision", "nncf", "safetensors", "huggingface_hub", "captum"]


def variant(repo_id: str, revision: str | None = None, device: str = "cpu"):
    """``(model, config)`` of the variant in Hub repo ``repo_id`` (``ORG/NAME``) or a local checkpoint
    directory, at ``revision``, on ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``); model in eval mode.
    """
    from surgery import load_variant

    return load_variant(repo_id, revision=revision, device=device)
