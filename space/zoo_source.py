"""Where the Space's models come from: the Hub, else a local zoo, else a zoo built here.

For each family the Space shows, :func:`resolve` tries, in order:

1. the Hugging Face Hub: repos ``ORG/<family>-<variant>`` (``--hub-org`` / ``SURGERY_HUB_ORG``),
   pulled with :func:`surgery.load_variant`;
2. a local zoo under ``--zoo`` / ``SURGERY_ZOO``: ``ZOO/<family>/fp32`` (or ``ZOO/fp32`` itself,
   as ``python -m training zoo --out ZOO`` writes it);
3. for ``resnet18-shapes`` only, whose data is generated: building the zoo here with the
   training CLI, progress bars and all (about 5 minutes on 2 CPU cores), into ``ZOO/resnet18-shapes``.

So ``python app.py`` on a fresh machine without internet still serves real trained models.
Each resolved family records where it came from, and the page says so.

Example:
    >>> config = SourceConfig.from_env(zoo=Path("zoo"), source="local")
    >>> families = resolve(config)
    >>> families["resnet18-shapes"].origin
    'local zoo zoo/resnet18-shapes'
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from surgery.checkpoint import CONFIG_FILE, CheckpointError, read_config
from surgery.loading import load_variant

logger = logging.getLogger(__name__)

DEFAULT_HUB_ORG = "compressed-cnn-surgery"
DEFAULT_FAMILIES = ("resnet18-shapes", "resnet18-cifar10", "resnet50-imagenet")
BUILDABLE_FAMILY = "resnet18-shapes"  # the one family whose training data needs no download
VARIANTS = ("fp32", "int8", "sparse90")  # what every family must have
CONTROL = "fp32-seed1"  # optional: the FP32 model trained with another seed
SOURCES = ("auto", "hub", "local")


class SourceError(RuntimeError):
    """No family could be loaded from any of the allowed sources; the message lists why."""


@dataclass(frozen=True)
class SourceConfig:
    """Where to look: flag values win over environment variables, which win over defaults."""

    hub_org: str = DEFAULT_HUB_ORG
    families: tuple[str, ...] = DEFAULT_FAMILIES
    zoo: Path = Path("zoo")
    source: str = "auto"  # auto: Hub, then local zoo, then build; hub / local: only that
    revision: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "zoo", Path(self.zoo))
        if self.source not in SOURCES:
            raise ValueError(f"model source must be one of {SOURCES}, got {self.source!r}")

    @classmethod
    def from_env(cls, hub_org: str | None = None, families: str | tuple[str, ...] | None = None,
                 zoo: str | Path | None = None, source: str | None = None,
                 revision: str | None = None) -> "SourceConfig":
        """Build from explicit values (flags), falling back to ``SURGERY_*`` environment variables."""
        env = os.environ
        families = families or env.get("SURGERY_FAMILIES")
        if isinstance(families, str):
            families = tuple(f.strip() for f in families.split(",") if f.strip())
        return cls(hub_org=hub_org or env.get("SURGERY_HUB_ORG") or DEFAULT_HUB_ORG,
                   families=tuple(families or DEFAULT_FAMILIES),
                   zoo=Path(zoo or env.get("SURGERY_ZOO") or "zoo"),
                   source=source or env.get("SURGERY_SOURCE") or "auto",
                   revision=revision or env.get("SURGERY_HUB_REVISION") or None)

    def repo_id(self, family: str, variant: str) -> str:
        return f"{self.hub_org}/{family}-{variant}"


@dataclass
class LoadedVariant:
    """One model as the Space holds it, with where it came from."""

    name: str
    model: nn.Module
    config: dict
    location: str  # a Hub repo id or a local directory
    repo_id: str | None = None  # set when pulled from the Hub


@dataclass
class FamilyZoo:
    """The loaded variants of one family (``fp32``, ``int8``, ``sparse90`` and maybe ``fp32-seed1``)."""

    family: str
    variants: dict[str, LoadedVariant]
    origin: str  # shown in the page: "Hugging Face Hub (ORG)", "local zoo DIR", "built here in DIR"


def _from_hub(config: SourceConfig, family: str) -> FamilyZoo:
    variants = {}
    for name in (*VARIANTS, CONTROL):
        repo_id = config.repo_id(family, name)
        try:
            model, cfg = load_variant(repo_id, revision=config.revision)
        except CheckpointError:  # HubError included
            if name == CONTROL:  # the seed control is optional
                logger.warning("no %s on the Hub: Representations shows no FP32-vs-FP32 control", repo_id)
                continue
            raise
        variants[name] = LoadedVariant(name, model, cfg, repo_id, repo_id)
    return FamilyZoo(family, variants, f"Hugging Face Hub ({config.hub_org})")


def family_zoo_dir(zoo: Path, family: str) -> Path | None:
    """The directory holding ``fp32/``, ``int8/``, ``sparse90/`` of ``family`` under ``zoo``, if any."""
    for candidate in (zoo / family, zoo):
        config = candidate / "fp32" / CONFIG_FILE
        if config.exists():
            try:
                if read_config(candidate / "fp32")["family"] == family:
                    return candidate
            except CheckpointError as exc:
                logger.warning("ignoring %s: %s", candidate, exc)
    return None


def is_complete(directory: Path) -> bool:
    return all((directory / v / CONFIG_FILE).exists() for v in VARIANTS)


def _from_local(directory: Path, family: str, origin: str) -> FamilyZoo:
    variants = {}
    for name in (*VARIANTS, CONTROL):
        path = directory / name
        if name == CONTROL and not path.exists():
            continue
        model, cfg = load_variant(path)
        if cfg["family"] != family:
            raise CheckpointError(f"{path}: holds family {cfg['family']!r}, expected {family!r}")
        variants[name] = LoadedVariant(name, model, cfg, str(path))
    return FamilyZoo(family, variants, origin)


def build_shapes_zoo(out: Path, max_steps: int | None = None) -> Path:
    """Train the ``resnet18-shapes`` zoo (with the seed control) into ``out`` with the training CLI.

    The CLI shows its progress bars and logs; an interrupted build resumes where it stopped.
    ``max_steps`` caps every epoch (a quick smoke build).
    """
    from training.cli import main as training_main  # the trainer is only needed on this path

    logger.warning("no %s models on the Hub or in a local zoo: training them now into %s "
                   "(about 5 minutes on 2 CPU cores; progress follows)", BUILDABLE_FAMILY, out)
    argv = ["zoo", "--family", BUILDABLE_FAMILY, "--out", str(out), "--seed-control"]
    status = training_main(argv + (["--max-steps", str(max_steps)] if max_steps else []))
    if status != 0 or not is_complete(out):
        raise SourceError(f"building the {BUILDABLE_FAMILY} zoo into {out} failed (exit status {status}); "
                          "see the log above")
    return out


def _from_hub_or_reason(config: SourceConfig, family: str) -> tuple[FamilyZoo | None, Exception | None]:
    try:
        return _from_hub(config, family), None
    except (CheckpointError, OSError) as exc:  # HubError is a CheckpointError: every reason counts
        logger.warning("%s: not loaded from the Hub (%s)", family, exc)
        return None, exc


def _unreachable(exc: Exception) -> bool:
    # surgery.hub says so in its message; a missing repo, by contrast, may concern one family only.
    text = str(exc)
    return "cannot reach the Hub" in text or "HF_HUB_OFFLINE" in text


def _from_disk(config: SourceConfig, family: str, reasons: list[str],
               build_steps: int | None) -> FamilyZoo | None:
    """A complete local zoo of ``family``, else (``auto`` source, shapes family) one built here."""
    if config.source in ("auto", "local"):
        directory = family_zoo_dir(config.zoo, family)
        if directory is not None and is_complete(directory):
            return _from_local(directory, family, f"local zoo {directory}")
        reasons.append(f"{family}: no complete local zoo under {config.zoo}")
    if config.source == "auto" and family == BUILDABLE_FAMILY:
        directory = build_shapes_zoo(config.zoo / family, build_steps)
        return _from_local(directory, family, f"built here in {directory}")
    return None


def resolve(config: SourceConfig, build_steps: int | None = None) -> dict[str, FamilyZoo]:
    """Load every configured family from the first source that has it; raise if none has any.

    ``build_steps`` caps the training epochs of a zoo built here (see :func:`build_shapes_zoo`).
    """
    reasons: list[str] = []
    use_hub = config.source in ("auto", "hub")
    families = {}
    for family in config.families:
        zoo = None
        if use_hub:
            zoo, error = _from_hub_or_reason(config, family)
            if error is not None:
                reasons.append(f"{family} from the Hub: {error}")
                use_hub = not _unreachable(error)  # don't wait for the same timeout once per family
        zoo = zoo or _from_disk(config, family, reasons, build_steps)
        if zoo is not None:
            families[family] = zoo
            logger.info("%s: %s (%s)", family, zoo.origin, ", ".join(zoo.variants))
    if not families:
        raise SourceError("no model family could be loaded:\n  " + "\n  ".join(reasons))
    return families
