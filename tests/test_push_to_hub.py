"""``python -m training zoo --push-to-hub ORG``: each variant reaches the Hub with its card as soon as it is built.

Against the Hub stand-in on 127.0.0.1 (``tests/hub_servers.py``); the training CLI runs in a
subprocess because ``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HOME`` when it is imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hub_servers import HubStandIn

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_stand_in_write_token"
ORG = "push-org"
FAMILY = "resnet18-shapes"
VARIANTS = ("fp32", "int8", "sparse90")
TINY = ["--train-samples", "64", "--eval-samples", "32", "--max-steps", "1"]


def training(args: list[str], *, endpoint: str, home: Path, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "training", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubStandIn(tmp_path_factory.mktemp("hub") / "mirrors", TOKEN) as stand_in:
        yield stand_in


@pytest.fixture(scope="module")
def pushed_build(hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / FAMILY
    done = training(["zoo", "--family", FAMILY, "--out", str(out), *TINY, "--push-to-hub", ORG],
                    endpoint=hub.url, home=tmp_path_factory.mktemp("home"), token=TOKEN)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done.stderr


def card_metadata(readme: bytes) -> dict:
    return yaml.safe_load(re.match(r"---\n(.*?)\n---\n", readme.decode(), flags=re.S)[1])


def test_every_variant_is_on_the_hub_with_its_card_when_the_command_returns(hub, pushed_build):
    out, _ = pushed_build
    for variant in VARIANTS:
        repo = f"{ORG}/{FAMILY}-{variant}"
        files = hub.repos.files(repo)
        assert {"config.json", "model.safetensors", "README.md"} <= set(files), repo
        for name in ("config.json", "model.safetensors"):
            assert files[name] == (out / variant / name).read_bytes(), f"{repo}/{name} is not the built file"
        meta = card_metadata(files["README.md"])
        assert meta.get("base_model") == (None if variant == "fp32" else f"{ORG}/{FAMILY}-fp32"), repo
        top1 = json.loads(files["config.json"])["metrics"]["top1"]  # pushed once evaluated
        card_top1 = meta["model-index"][0]["results"][0]["metrics"][0]
        assert card_top1["type"] == "accuracy" and card_top1["value"] == round(top1, 4), repo
        assert repo not in hub.private


def test_each_variant_is_pushed_before_the_next_is_built(pushed_build):
    _, log = pushed_build
    events = [(m["what"], m["variant"]) for m in re.finditer(
        r"(?P<what>saved|pushed) (?:resnet18-shapes/|\S+/)(?P<variant>fp32|int8|sparse90)\b", log)]
    assert events == [(what, v) for v in VARIANTS for what in ("saved", "pushed")], events


def test_no_token_fails_before_training(hub, tmp_path):
    out = tmp_path / "zoo"
    done = training(["zoo", "--family", FAMILY, "--out", str(out), *TINY, "--push-to-hub", ORG],
                    endpoint=hub.url, home=tmp_path / "home", token=None)
    assert done.returncode == 2
    assert "no Hub token found; set HF_TOKEN" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_refused_push_is_one_message(hub, tmp_path):
    done = training(["zoo", "--family", FAMILY, "--out", str(tmp_path / "zoo"), *TINY, "--push-to-hub", ORG],
                    endpoint=hub.url, home=tmp_path / "home", token="hf_wrong_token")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "push of" in done.stderr and "401" in done.stderr and "HF_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr
