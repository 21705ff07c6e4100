"""The package as a stranger gets it: ``pip install`` into a fresh virtual environment, then use it
from a directory outside the checkout.

One session fixture builds the environment (``python3.11 -m venv`` + ``pip install`` of a copy of
the checkout: torch comes from the local wheel cache; about a minute, the slow part of this file,
its time printed) and every test reuses it. A local path install stands in for the
``git+https://github.com/...`` URL of the model card's install command: the Hub cannot be reached
here, and neither can GitHub; the test runs the card's command with only that URL replaced.
Hub repos come from the local Hub servers of ``tests/hub_servers.py`` (pushes to the stand-in,
pulls through ``olah``).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement

from hub_servers import HubStandIn, Olah
from surgery.project import DISTRIBUTION, INSTALL_COMMAND, PROJECT_URL, REPOSITORY

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_stand_in_write_token"
ORG = "install-org"
FAMILY = "resnet18-shapes"
INT8_REPO = f"{ORG}/{FAMILY}-int8"
# What a clone would not hold, or what is this machine's own: left out of the copy that is installed.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "build", "dist", "*.egg-info", "zoo",
                                    "runs", "artifacts", ".gradio", ".pytest_cache")


def _run(command: list[str] | str, *, cwd: Path, env: dict | None = None, timeout: float = 900,
         shell: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, shell=shell)


def _clean_env(venv: Path, **extra: str) -> dict:
    """An environment that knows nothing of the checkout: no PYTHONPATH, the venv first on PATH.

    NNCF's compiled extension gets a directory of its own: torch keys the build by its compiler
    flags, which name the venv's include paths, so sharing the default one with another venv would
    recompile it (~30 s) at every switch between them, here and in every other process on the machine.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {"PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", "VIRTUAL_ENV": str(venv),
            "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "TORCH_EXTENSIONS_DIR": str(venv.parent / "torch-extensions")}
    return env | extra


@pytest.fixture(scope="session")
def installed(tmp_path_factory, request) -> SimpleNamespace:
    """A fresh venv with ``pip install`` of a copy of the checkout (no extras); a directory outside both."""
    root = tmp_path_factory.mktemp("install")
    source = root / "checkout"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE)
    venv = root / "venv"
    started = time.perf_counter()
    done = _run([shutil.which("python3.11") or "python3.11", "-m", "venv", str(venv)], cwd=root)
    assert done.returncode == 0, done.stderr
    done = _run([str(venv / "bin" / "pip"), "install", "-q", str(source)], cwd=root, env=_clean_env(venv))
    assert done.returncode == 0, done.stderr[-4000:]
    seconds = time.perf_counter() - started
    message = f"fresh venv + pip install of the checkout: {seconds:.0f} s"
    logger.info(message)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown even when the test passes
            reporter.write_line(f"\n[test_install] {message}")
    outside = root / "elsewhere"
    outside.mkdir()
    return SimpleNamespace(venv=venv, python=str(venv / "bin" / "python"), source=source, outside=outside,
                           seconds=seconds)


def run_outside(installed, code: str, **env: str) -> subprocess.CompletedProcess:
    """``python -c CODE`` with the venv's Python in the directory outside the checkout."""
    return _run([installed.python, "-c", code], cwd=installed.outside, env=_clean_env(installed.venv, **env))


def last_json(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hub(tiny_zoo, tmp_path_factory):
    """The tiny zoo pushed with ``push-zoo`` to the stand-in; pulls go through olah. Yields the servers."""
    root = tmp_path_factory.mktemp("install-hub")
    with HubStandIn(root / "mirrors", TOKEN) as stand_in, Olah(root / "mirrors", root) as olah:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env |= {"HF_ENDPOINT": stand_in.url, "HF_HOME": str(root / "push-home"), "HF_TOKEN": TOKEN,
                "PYTHONPATH": str(REPO_ROOT)}
        done = _run([sys.executable, "-m", "hub_export", "push-zoo", str(tiny_zoo), "--org", ORG],
                    cwd=REPO_ROOT, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
        yield SimpleNamespace(stand_in=stand_in, olah=olah, home=root / "pull-home")


def _logits(directory: Path, size: int = 64) -> list[list[float]]:
    """Logits of the checkpoint loaded here, from the checkout, on the probe images of :data:`PROBE`."""
    import torch

    from surgery import load_variant

    model, _ = load_variant(directory)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x).tolist()


PROBE = """
import json, sys, torch, surgery
model, config = surgery.load_variant({source!r})
x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(x)
e = surgery.explain(model, x)
acts = surgery.activation_maximization(model, "layer4", [0], steps=2, size=64, progress=lambda s, t: None)
print(json.dumps({{"logits": logits.tolist(), "file": surgery.__file__, "kind": config["kind"], "variant": config["variant"],
                  "gradcam": list(e.gradcam.shape), "actmax": list(acts.images.shape),
                  "cka": float(surgery.cka(e.saliency.flatten(1), e.gradcam.flatten(1), estimator="biased"))}}))
"""


def close(a: list[list[float]], b: list[list[float]], tol: float = 1e-5) -> bool:
    return all(abs(x - y) <= tol for ra, rb in zip(a, b) for x, y in zip(ra, rb))


# -- the package's declarations --------------------------------------------------------------------

def _requirements_txt() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = str(next(iter(req.specifier)).version)
    return pins


def test_pyproject_pins_agree_with_requirements_txt():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = _requirements_txt()
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    assert project["name"] == DISTRIBUTION
    for req in declared:
        name = req.name.lower().replace("_", "-")
        if name == DISTRIBUTION:  # an extra naming other extras
            continue
        assert name in pins, f"{req} is not pinned in requirements.txt (what the Space installs)"
        assert req.specifier.contains(pins[name]), f"pyproject says {req}, requirements.txt pins {pins[name]}"
    exact = {r.name: str(r.specifier) for r in declared}
    assert exact["torch"] == "==2.14.1" and exact["torchvision"] == "==0.29.1"
    assert not {"gradio", "matplotlib", "pytest"} & {r.name for r in map(Requirement, project["dependencies"])}
    assert project["urls"]["Homepage"] == PROJECT_URL
    assert INSTALL_COMMAND == f'pip install "{DISTRIBUTION} @ git+https://github.com/{REPOSITORY}"'


# -- the installed package, from outside the checkout ----------------------------------------------

def test_install_holds_surgery_and_its_tools_but_not_the_space_dependencies(installed):
    done = run_outside(installed, """
import importlib.util, json, surgery, study.page
print(json.dumps({"surgery": surgery.__file__, "template": study.page._TEMPLATE.is_file(),
                  "missing": [m for m in ("gradio", "pytest", "olah") if importlib.util.find_spec(m) is not None]}))
""")
    found = last_json(done)
    assert found["surgery"].startswith(str(installed.venv)), "imported from the checkout, not the install"
    assert found["template"], "package data (study/template.html) was not installed"
    assert found["missing"] == [], f"a plain install brought {found['missing']}"


def test_load_variant_from_a_local_zoo_outside_the_checkout(installed, tiny_zoo):
    result = last_json(run_outside(installed, PROBE.format(source=str(tiny_zoo / "int8"))))
    assert (result["kind"], result["variant"]) == ("quantized", "int8")
    assert result["file"].startswith(str(installed.venv))
    assert close(result["logits"], _logits(tiny_zoo / "int8"))
    assert result["gradcam"] == [2, 64, 64] and result["actmax"] == [1, 3, 64, 64]


def test_load_variant_by_repo_id_from_the_local_hub(installed, hub, tiny_zoo):
    result = last_json(run_outside(installed, PROBE.format(source=INT8_REPO), HF_ENDPOINT=hub.olah.url,
                                   HF_HOME=str(hub.home)))
    assert (result["kind"], result["variant"]) == ("quantized", "int8") and close(result["logits"], _logits(tiny_zoo / "int8"))


def test_console_scripts(installed, tmp_path):
    bin_ = installed.venv / "bin"
    tools = ("surgery-train", "surgery-hub", "surgery-report", "surgery-study")
    commands = {script: [str(bin_ / script), "--help"] for script in (*tools, "surgery-space")}
    commands["refused"] = [str(bin_ / "surgery-hub"), "push-zoo", str(tmp_path / "none"), "--org", ORG,
                           "--dry-run", str(tmp_path / "out")]
    # Each one starts Python and imports torch: run side by side, not one after another.
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        runs = {name: pool.submit(_run, command, cwd=installed.outside, env=_clean_env(installed.venv))
                for name, command in commands.items()}
        done = {name: run.result() for name, run in runs.items()}
    for script in tools:
        help_ = done[script]
        assert help_.returncode == 0 and "usage:" in help_.stdout, f"{script}: {help_.stderr[-2000:]}"
    assert done["refused"].returncode == 2 and "no such zoo directory" in done["refused"].stderr
    space = done["surgery-space"]
    assert space.returncode != 0 and 'pip install "compressed-cnn-surgery[space]"' in space.stderr, \
        "without the [space] extra the Space must name the extra it needs"


def test_torch_hub_load_returns_a_variant_from_a_checkout(installed, hub, tiny_zoo):
    code = """
import json, torch
model, config = torch.hub.load({checkout!r}, "variant", source="local", repo_id={repo!r})
x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    print(json.dumps({{"logits": model(x).tolist(), "kind": config["kind"], "variant": config["variant"],
                  "training": model.training}}))
"""
    expected = _logits(tiny_zoo / "int8")
    for repo in (str(tiny_zoo / "int8"), INT8_REPO):
        result = last_json(run_outside(installed, code.format(checkout=str(installed.source), repo=repo),
                                       HF_ENDPOINT=hub.olah.url, HF_HOME=str(hub.home)))
        assert (result["kind"], result["variant"]) == ("quantized", "int8"), repo
        assert not result["training"] and close(result["logits"], expected), repo


# -- the model card, verbatim ------------------------------------------------------------------------

def _how_to_load(readme: str) -> tuple[str, str]:
    section = readme.split("## How to load", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    assert [lang for lang, _ in blocks] == ["bash", "python"], blocks
    return blocks[0][1].strip(), blocks[1][1]


def test_the_model_card_code_runs_verbatim_after_its_install_command(installed, hub, tiny_zoo):
    readme = hub.stand_in.repos.files(INT8_REPO)["README.md"].decode()  # the card as pushed
    install, code = _how_to_load(readme)
    assert install == INSTALL_COMMAND, "the card's block must start with the install command"
    local = install.replace(f"git+{PROJECT_URL}", installed.source.as_uri())  # the only change: the URL
    assert local != install
    done = _run(local, cwd=installed.outside, env=_clean_env(installed.venv), shell=True)
    assert done.returncode == 0, done.stderr[-4000:]
    script = installed.outside / "card.py"
    script.write_text(code)
    done = _run([installed.python, str(script)], cwd=installed.outside,
                env=_clean_env(installed.venv, HF_ENDPOINT=hub.olah.url, HF_HOME=str(hub.home)))
    assert done.returncode == 0, done.stderr[-4000:]
    printed = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    class_names = json.loads((tiny_zoo / "int8" / "config.json").read_text())["class_names"]
    assert len(printed) == 2 and set(printed) <= set(class_names), printed


def test_editable_install_imports_from_the_checkout(installed):
    """Last: it replaces the regular install in the shared venv."""
    done = _run([str(installed.venv / "bin" / "pip"), "install", "-q", "-e", str(installed.source)],
                cwd=installed.outside, env=_clean_env(installed.venv))
    assert done.returncode == 0, done.stderr[-4000:]
    found = last_json(run_outside(installed, "import json, surgery, study.page; "
                                             "print(json.dumps([surgery.__file__, str(study.page._TEMPLATE)]))"))
    assert all(path.startswith(str(installed.source)) for path in found), found
