"""Where the Space's models come from: the Hub, else a local zoo, else a zoo built here.

For each family the Space shows, :func:`resolve` tries, in order:

1. the Hugging Face Hub: repos ``ORG/<family>-<variant>`` (``--hub-org`` / ``SURGERY_HUB_ORG``)
   for every name of :func:`hub_candidates` (the default zoo, ``int8-ptq``, the ladder, two seed controls and
   another recipe's FP32), pulled with :func:`surgery.load_variant`; those that exist are kept;
2. a local zoo under ``--zoo`` / ``SURGERY_ZOO``: ``ZOO/<family>/fp32`` (or ``ZOO/fp32`` itself,
   as ``python -m training zoo --out ZOO`` writes it), with every variant directory beside it;
3. for a family whose data is on this machine (:func:`surgery.data.offline_available`):
   building the zoo here with the training CLI into ``ZOO/<family>``. The first such family, when
   no family is served yet, gets what the first page needs now (:meth:`BuildOptions.first`: FP32,
   and INT8 too for a pretrained FP32), in a child process whose progress bars the preparing page
   shows; the rest (the default zoo, the seed control, the ladder if asked) is left in
   :attr:`FamilyZoo.pending` for :mod:`space.background` to train while the page is served. Any
   later family is built wholly in the background (no model yet, everything pending) and joins
   the page when its FP32 model is ready.

A zoo is complete enough to serve when it has ``fp32``; compressed variants and seed controls
are whatever it holds. Each resolved family records where it came from, and the page says so.

Example:
    >>> config = SourceConfig.from_env(zoo=Path("zoo"), source="local")
    >>> families = resolve(config)
    >>> families["resnet18-shapes"].origin, list(families["resnet18-shapes"].variants)
    ('local zoo zoo/resnet18-shapes', ['fp32', 'int8', 'sparse90', 'fp32-seed1'])
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from space.trainer import LOG_FILE, Trainer
from surgery.checkpoint import CONFIG_FILE, CheckpointError, read_config
from surgery.data import offline_available
from surgery.loading import load_variant
from surgery.registry import get_family
from surgery.variants import DEFAULT_ZOO, LADDER, parse_variant, seed_name, sort_variants

logger = logging.getLogger(__name__)

DEFAULT_HUB_ORG = "compressed-cnn-surgery"
DEFAULT_FAMILIES = ("mobilenetv2-imagenet", "resnet18-shapes", "resnet18-fashionmnist", "resnet18-cifar10",
                    "resnet50-imagenet")
# Of the default families, those built here when no zoo has them. The first page is the pretrained
# MobileNetV2: its FP32 needs no training, so a fresh machine serves it with INT8 within minutes;
# shapes and Fashion-MNIST train in the background afterwards and join the page when ready. A family
# named with --families is built when its data is here.
DEFAULT_BUILD = ("mobilenetv2-imagenet", "resnet18-shapes", "resnet18-fashionmnist")
REQUIRED = "fp32"  # what a family must have to be served: every comparison is against it
SEED_CONTROLS = tuple(seed_name("fp32", k) for k in (1, 2))
RECIPE_CONTROL = "fp32-recipe1"  # a pretrained family's other training run (torchvision's other weights)
# Built before the page is served on a fresh machine (the first family built here only); the rest
# follows in the background and joins the page when ready. A family whose FP32 trains here waits
# for FP32 alone: on a fresh 2-core machine (README) the shapes fp32 and int8 trained in 200-233 s and
# 74-82 s, so with int8 the first answer came at 347 s in one run and would have come after 6
# minutes in another. A pretrained FP32 (torchvision's weights as they are) costs nothing, so INT8
# is derived first and the first page compares the two: INT8's calibration alone (``int8-ptq``, about
# a minute), since its recipe's distillation takes minutes more (``int8`` follows in the background).
# ``--serve-after`` sets it for every family.
SERVE_AFTER = ("fp32",)
SERVE_AFTER_PRETRAINED = ("fp32", "int8-ptq")
BUILD_MARKER = ".space-build.json"  # in a zoo this app builds: what it set out to build
SOURCES = ("auto", "hub", "local")


def hub_candidates() -> list[str]:
    """The variant names tried on the Hub, in display order (a pretrained family's first page among them)."""
    return sort_variants(dict.fromkeys((*DEFAULT_ZOO, *SERVE_AFTER_PRETRAINED, *LADDER, *SEED_CONTROLS, RECIPE_CONTROL)))


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
    build: tuple[str, ...] | None = DEFAULT_BUILD  # built here if missing (None: any with offline data)

    def may_build(self, family: str) -> bool:
        """Whether ``family`` is trained here when neither the Hub nor a local zoo has it."""
        return self.source == "auto" and offline_available(family) and (self.build is None or family in self.build)

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
                   revision=revision or env.get("SURGERY_HUB_REVISION") or None,
                   build=None if families else DEFAULT_BUILD)

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

    @property
    def title(self) -> str:
        return parse_variant(self.name).title


@dataclass
class FamilyZoo:
    """The loaded variants of one family (``fp32`` and whatever else its zoo holds)."""

    family: str
    variants: dict[str, LoadedVariant]
    origin: str  # shown in the page: "Hugging Face Hub (ORG)", "local zoo DIR", "built here in DIR"
    directory: Path | None = None  # where a local zoo lies
    pending: tuple[str, ...] = ()  # still to be trained into ``directory`` while the page is served


@dataclass(frozen=True)
class BuildOptions:
    """How a zoo is built here: ``steps`` caps every epoch (a smoke build), :meth:`first` is built
    before the page is served (``serve_after``, default per family), the rest of :meth:`plan` in
    the background."""

    steps: int | None = None
    serve_after: tuple[str, ...] | None = None
    ladder: bool = False

    def __post_init__(self) -> None:
        if self.serve_after is None:
            return
        names = tuple(dict.fromkeys(self.serve_after))
        for name in names:
            parse_variant(name)  # ValueError with the grammar
        if REQUIRED not in names:
            raise ValueError(f"the variants served first must include {REQUIRED}, got {', '.join(names)}")
        object.__setattr__(self, "serve_after", names)

    def first(self, family: str) -> tuple[str, ...]:
        """What the first page waits for: ``serve_after``, else FP32, with INT8 where FP32 is
        torchvision's weights as they are (see :data:`SERVE_AFTER_PRETRAINED`)."""
        if self.serve_after is not None:
            return self.serve_after
        return SERVE_AFTER if get_family(family).has_fp32_seeds else SERVE_AFTER_PRETRAINED

    def plan(self, family: str) -> list[str]:
        """Everything a zoo of ``family`` built here gets: first :meth:`first`, then the default
        zoo, the seed control (none for a pretrained family: it has no seeds) and, with
        ``ladder``, the whole ladder."""
        ladder = sort_variants(LADDER) if self.ladder else []
        control = (SEED_CONTROLS[0],) if get_family(family).has_fp32_seeds else ()
        return list(dict.fromkeys((*self.first(family), *DEFAULT_ZOO, *control, *ladder)))


def load_member(name: str, location: str | Path, family: str, repo_id: str | None = None,
                revision: str | None = None) -> LoadedVariant:
    """Load one variant for the Space (the one place models are loaded); checks its family."""
    model, cfg = load_variant(repo_id or location, revision=revision)
    if cfg["family"] != family or cfg.get("variant", name) != name:
        raise CheckpointError(f"{location}: holds {cfg['family']}/{cfg.get('variant')}, expected {family}/{name}")
    return LoadedVariant(name, model, cfg, str(location), repo_id)


def _from_hub(config: SourceConfig, family: str) -> FamilyZoo:
    variants = {}
    for name in hub_candidates():
        repo_id = config.repo_id(family, name)
        try:
            variants[name] = load_member(name, repo_id, family, repo_id=repo_id, revision=config.revision)
        except CheckpointError as exc:  # HubError included
            if name == REQUIRED:
                raise
            logger.info("%s: not on the Hub (%s)", repo_id, str(exc).splitlines()[0])
    if not any(parse_variant(v).is_control for v in variants):
        control = SEED_CONTROLS[0] if get_family(family).has_fp32_seeds else RECIPE_CONTROL
        logger.warning("no %s on the Hub: Representations shows no FP32-vs-FP32 control",
                       config.repo_id(family, control))
    return FamilyZoo(family, variants, f"Hugging Face Hub ({config.hub_org})")


def family_zoo_dir(zoo: Path, family: str) -> Path | None:
    """The directory holding ``fp32/`` (and its sibling variants) of ``family`` under ``zoo``, if any."""
    for candidate in (zoo / family, zoo):
        config = candidate / REQUIRED / CONFIG_FILE
        if config.exists():
            try:
                if read_config(candidate / REQUIRED)["family"] == family:
                    return candidate
            except CheckpointError as exc:
                logger.warning("ignoring %s: %s", candidate, exc)
    return None


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` is a zoo the Space can serve: it has ``fp32``."""
    return (directory / REQUIRED / CONFIG_FILE).exists()


def zoo_variants(directory: Path) -> list[str]:
    """The variant names built in ``directory`` (sub-directories with a ``config.json``), in order."""
    names = []
    for path in directory.iterdir() if directory.is_dir() else ():
        try:
            parse_variant(path.name)
        except ValueError:
            continue  # resume state, logs, anything else
        if (path / CONFIG_FILE).exists():
            names.append(path.name)
    return sort_variants(names)


def _from_local(directory: Path, family: str, origin: str) -> FamilyZoo:
    variants = {}
    for name in zoo_variants(directory):
        try:
            variants[name] = load_member(name, directory / name, family)
        except CheckpointError as exc:
            if name == REQUIRED:
                raise
            logger.warning("skipping %s: %s", directory / name, exc)
    return FamilyZoo(family, variants, origin, directory=directory)


def zoo_argv(family: str, out: Path, variants: list[str], steps: int | None) -> list[str]:
    """The training CLI's arguments that build ``variants`` into ``out``: foreground and background
    builds both go through this, so they train the same models."""
    argv = ["zoo", "--family", family, "--out", str(out), "--variants", ",".join(variants)]
    return argv + (["--max-steps", str(steps)] if steps else [])


def build_here(family: str, out: Path, options: BuildOptions) -> Path:
    """Train :meth:`BuildOptions.first` of ``family`` into ``out`` with the training CLI, in a child
    process (:class:`space.trainer.Trainer`, whose bars the preparing page shows), waiting for it;
    an interrupted build resumes.

    The whole plan is recorded in ``out/.space-build.json``, so a restart trains what is missing.
    """
    first = options.first(family)
    logger.warning("no %s models on the Hub or in a local zoo: training them now into %s "
                   "(%s first, then the page; %s in the background)", family, out,
                   ", ".join(first), ", ".join(options.plan(family)[len(first):]))
    _mark(family, out, options)
    trainer = Trainer(zoo_argv(family, out, list(first), options.steps), out / LOG_FILE)
    status = trainer.wait()
    if status != 0 or not is_complete(out):
        tail = "\n".join(trainer.output(last_bytes=4096).replace("\r", "\n").splitlines()[-15:])
        raise SourceError(f"building the {family} zoo into {out} failed (exit status {status}); "
                          f"the end of its log {trainer.log_path}:\n{tail}")
    return out


def _mark(family: str, out: Path, options: BuildOptions) -> None:
    """Record in ``out`` what this app sets out to build there (a restart builds what is missing)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_MARKER).write_text(json.dumps({"family": family, "variants": options.plan(family)}) + "\n")


def build_later(family: str, out: Path, options: BuildOptions) -> FamilyZoo:
    """A family to be built wholly in the background, while other families are served: no model
    yet, its whole plan :attr:`FamilyZoo.pending`. It joins the page when its FP32 model is ready."""
    logger.warning("no %s models on the Hub or in a local zoo: they will be trained into %s in the background "
                   "(%s)", family, out, ", ".join(options.plan(family)))
    _mark(family, out, options)
    return FamilyZoo(family, {}, f"built here in {out}", directory=out, pending=_still_to_build(out, family, options))


def _still_to_build(directory: Path, family: str, options: BuildOptions) -> tuple[str, ...]:
    """What a zoo built here set out to build (and the ladder, if now asked) but has not yet."""
    marker = directory / BUILD_MARKER
    if not marker.exists():
        return ()  # someone else's zoo: served as it is
    planned = json.loads(marker.read_text()).get("variants", [])
    wanted = dict.fromkeys((*planned, *options.plan(family)))
    built = set(zoo_variants(directory))
    return tuple(v for v in wanted if v not in built)


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


def _from_disk(config: SourceConfig, family: str, reasons: list[str], build: BuildOptions,
               foreground: bool) -> FamilyZoo | None:
    """A local zoo of ``family`` with its FP32 model, else (``auto`` source, data on this machine)
    one built here: its first variants now when ``foreground`` (no family is served yet), else
    all of it in the background (:func:`build_later`). A zoo this app began building keeps its
    unbuilt variants as ``pending``."""
    buildable = config.may_build(family)
    if config.source in ("auto", "local"):
        directory = family_zoo_dir(config.zoo, family)
        if directory is not None and is_complete(directory):
            built_here = (directory / BUILD_MARKER).exists()
            zoo = _from_local(directory, family, f"{'built here in' if built_here else 'local zoo'} {directory}")
            zoo.pending = _still_to_build(directory, family, build) if buildable else ()
            return zoo
        reasons.append(f"{family}: no local zoo with an {REQUIRED} model under {config.zoo}")
    if buildable and not foreground:
        return build_later(family, config.zoo / family, build)
    if buildable:
        directory = build_here(family, config.zoo / family, build)
        zoo = _from_local(directory, family, f"built here in {directory}")
        zoo.pending = _still_to_build(directory, family, build)
        return zoo
    return None


def resolve(config: SourceConfig, build: BuildOptions = BuildOptions()) -> dict[str, FamilyZoo]:
    """Load every configured family from the first source that has it; raise if none has any.

    ``build`` says how a zoo is built here: the first family that must be built while no other is
    ready gets its first variants before this returns (:func:`build_here`); any later one is
    returned with no model yet, all of it pending, to be built in the background (:func:`build_later`).
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
        served = any(z.variants for z in families.values())
        zoo = zoo or _from_disk(config, family, reasons, build, foreground=not served)
        if zoo is not None:
            families[family] = zoo
            logger.info("%s: %s (%s%s)", family, zoo.origin, ", ".join(zoo.variants) or "no model yet",
                        f"; still to train: {', '.join(zoo.pending)}" if zoo.pending else "")
    if not any(z.variants for z in families.values()):
        raise SourceError("no model family could be loaded:\n  " + "\n  ".join(reasons))
    return families
