"""The package as a stranger gets it: ``pip install`` into a fresh virtual environment, then use it
from a directory outside the checkout.

The environment (``python3.11 -m venv`` + ``pip install`` of a copy of the checkout: torch comes from
the local wheel cache) is one of the session's builds (``tests/builds.py``): made in a background
thread while the zoos train, its time printed with theirs. A local path install stands in for the
``git+https://github.com/...`` URL of the model card's install command: the Hub cannot be reached
here, and neither can GitHub; the test runs the card's command with only that URL replaced.
Hub repos come from the session's local Hub servers (conftest's ``hub``: the untrained zoo pushed
with ``push-zoo``, pulled through ``olah``).
"""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.requirements import Requirement

from builds import clean_env as _clean_env
from hub_servers import ORG, PULL_DEADLINE_S
from surgery.project import DISTRIBUTION, INSTALL_COMMAND, PROJECT_URL, REPOSITORY

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILY = "resnet18-shapes"
INT8_REPO = f"{ORG}/{FAMILY}-int8"


def _run(command: list[str] | str, *, cwd: Path, env: dict | None = None, timeout: float = 900,
         shell: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, shell=shell)


def _hub_env(hub) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.olah.url, "HF_HOME": str(hub.root / "install-pull-home"),
            "SURGERY_HUB_DEADLINE_S": PULL_DEADLINE_S}


def run_outside(installed, code: str, **env: str) -> subprocess.CompletedProcess:
    """``python -c CODE`` with the venv's Python in the directory outside the checkout."""
    return _run([installed.python, "-c", code], cwd=installed.outside, env=_clean_env(installed.venv, **env))


def last_json(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def test_torch_hub_load_returns_a_variant_by_repo_id_from_a_checkout(installed, hub, tiny_zoo):
    """``torch.hub.load`` with ``source="local"`` and a Hub repo id: the checkout's hubconf.py, the
    installed package, a pull from the local Hub; a local directory as repo_id is what the probe above loads."""
    code = """
import json, torch
model, config = torch.hub.load({checkout!r}, "variant", source="local", repo_id={repo!r})
x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    print(json.dumps({{"logits": model(x).tolist(), "kind": config["kind"], "variant": config["variant"],
                  "training": model.training}}))
"""
    result = last_json(run_outside(installed, code.format(checkout=str(installed.source), repo=INT8_REPO),
                                   **_hub_env(hub)))
    assert (result["kind"], result["variant"]) == ("quantized", "int8")
    assert not result["training"] and close(result["logits"], _logits(tiny_zoo / "int8"))


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
    done = _run([installed.python, str(script)], cwd=installed.outside, env=_clean_env(installed.venv, **_hub_env(hub)))
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
