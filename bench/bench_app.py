"""The Space's speed: one Explain request per family against its floor, and start-up to first answer.

1. **Explain vs floor.** The floor is what one Explain request cannot do without: one forward and
   one backward pass (to the input) of each variant of the default columns on the image. Measured in the
   same process, interleaved, medians of ``--repeats``:

   - ``handler``: the page's Explain handler in-process (decode, crop, three fused
     GradCAM+saliency passes, the comparisons, the overlays);
   - ``http``: the same request through the running app with ``gradio_client`` (upload, queue,
     PNG encoding and download of the six maps included);
   - ``http, raw``: the same request as the page's own JavaScript client makes it, over one
     keep-alive connection: upload, ``/gradio_api/call/explain``, its event stream, then the
     maps (two per column) fetched in parallel as a browser does. ``gradio_client`` adds ~100 ms of its own per call
     (the last line of the table compares both on a request that computes nothing).

   Families without a local zoo are measured on stand-in variants built here with
   :mod:`surgery.compression` from untrained weights: an INT8 or 90%-sparse ResNet costs the same
   to run whatever its weights (the sparse kernels are dense).

2. **Start-up.** ``python app.py`` in a fresh process until the first Explain answer arrives,
   with cold caches (empty ``--cache-dir`` and ``TORCH_EXTENSIONS_DIR``: NNCF's CPU extension is
   compiled and the Features tab's first view is computed) and then warm (both reused).

3. **Fresh machine** (``--fresh``). ``python app.py`` with its default families, no Hub
   (``HF_HUB_OFFLINE=1``, empty ``HF_HOME``), no zoo, no torchvision weights (empty ``TORCH_HOME``,
   pip's cache off), a fresh cache and a fresh NNCF extension dir: it fetches the MobileNetV2
   weights, derives what the first page serves (FP32 and ``int8-ptq`` of ``mobilenetv2-imagenet``, or
   ``--serve-after``), serves, and builds the rest in the background. Measured: seconds to the
   page, to the first Explain answer on a photo (the target: at most 3 minutes on 2 cores, with
   FP32 and INT8 columns) and FP32's top-1 there, then when each family built in the background
   joins the page and when it is complete (until ``--fresh-timeout``).

Usage:
    python bench/bench_app.py --zoo zoo/resnet18-shapes [--families resnet18-shapes resnet50-imagenet]
                              [--repeats 5] [--startup]
    python bench/bench_app.py --families --fresh [--serve-after fp32,int8-ptq] [--build-steps N] [--fresh-timeout S]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import space  # noqa: E402,F401  (no analytics, no telemetry)
import httpx  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from space.examples import PHOTOS, Example, photo_path  # noqa: E402
from space.preparing import serves_the_space  # noqa: E402
from space.session import Session  # noqa: E402
from space.ui import MAPS_FOLDER, Handlers, build_demo  # noqa: E402
from space.zoo_source import (DEFAULT_BUILD, DEFAULT_FAMILIES, FamilyZoo, LoadedVariant, SourceConfig,  # noqa: E402
                               resolve, zoo_variants)
from surgery.data import offline_available  # noqa: E402
from surgery import compression  # noqa: E402
from surgery.checkpoint import read_config  # noqa: E402
from surgery.devices import faithful, resolve_device  # noqa: E402
from surgery.images import load_image  # noqa: E402
from surgery.registry import build_model, get_family  # noqa: E402
from timing import measure  # noqa: E402


STAND_INS = ("fp32", "int8", "sparse90")


def stand_in_zoo(family_name: str) -> FamilyZoo:
    """fp32, int8 and sparse90 of ``family_name`` from untrained weights, made as the trainer makes them."""
    family = get_family(family_name)
    torch.manual_seed(0)
    fp32 = build_model(family).eval()
    batches = [torch.rand(8, 3, family.input_size, family.input_size) for _ in range(2)]
    int8 = compression.quantize(copy.deepcopy(fp32), batches, num_samples=16).eval()
    sparse = copy.deepcopy(fp32)
    scheduler = compression.start_magnitude_sparsity(sparse, batches[0][:2], 0.9, ramp_updates=1)
    scheduler.step(1)
    compression.bake_sparsity(sparse)
    config = {"class_names": list(family.class_names), "metrics": {}}
    variants = {name: LoadedVariant(name, model.eval(), {**config, "weights": {"sha256": f"bench-{name}" * 2}},
                                    "stand-in (untrained)")
                for name, model in zip(STAND_INS, (fp32, int8, sparse))}
    return FamilyZoo(family_name, variants, "stand-in variants built by the bench")


def floor_once(zoo: FamilyZoo, x: torch.Tensor, columns: list[str]) -> float:
    """One forward and one backward to the input per column: what any Explain must at least do
    (the image moved to the models' device and the input gradient back, as a request does)."""
    started = time.perf_counter()
    for variant in (zoo.variants[name] for name in columns):
        device = next(variant.model.parameters()).device
        image = x[None].to(device).requires_grad_(True)
        with compression.forward_lock(variant.model):
            logits = variant.model(image)
        torch.autograd.grad(logits[0, logits[0].argmax()], image)[0].cpu()
    return time.perf_counter() - started


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def _raw_call(http: httpx.Client, api: str, data: list) -> list:
    """One call of the app's HTTP API as its JavaScript client makes it; returns the outputs."""
    event = http.post(f"/gradio_api/call/{api}", json={"data": data}).raise_for_status().json()["event_id"]
    stream = http.get(f"/gradio_api/call/{api}/{event}").raise_for_status().text
    kind, _, payload = stream.strip().rpartition("data: ")
    if "event: complete" not in kind:
        raise RuntimeError(f"/{api} failed: {stream[-500:]}")
    return json.loads(payload)


def raw_explain(http: httpx.Client, photo: Path, family: str, columns: list[str], pool: ThreadPoolExecutor) -> None:
    """Upload, Explain, then fetch the maps in parallel: the page's own sequence of requests."""
    files = {"files": (photo.name, photo.read_bytes(), "image/png")}
    path = http.post("/gradio_api/upload", files=files).raise_for_status().json()[0]
    outputs = _raw_call(http, "explain", [{"path": path, "meta": {"_type": "gradio.FileData"}}, family, "gradient",
                                          columns])
    urls = [o["url"] for o in outputs if isinstance(o, dict) and o.get("url")]
    assert len(urls) == 2 * len(columns), f"expected {2 * len(columns)} maps, got {urls}"
    list(pool.map(lambda url: http.get(url).raise_for_status().content, urls))


def explain_table(families: dict[str, FamilyZoo], photo: Path, repeats: int, device: torch.device) -> None:
    session = Session(families, cache_dir=Path(tempfile.mkdtemp(prefix="bench-space-")), device=device)
    demo = build_demo(session, examples={family: [Example(photo, photo.stem)] for family in families})
    handlers = Handlers(session, Path(tempfile.mkdtemp(prefix="bench-maps-")))
    demo.launch(prevent_thread_lock=True, quiet=True)
    client = Client(demo.local_url, verbose=False)
    http = httpx.Client(base_url=demo.local_url.rstrip("/"), timeout=60)
    pool = ThreadPoolExecutor(6)  # a browser's connections per host
    payload = {"path": str(photo), "orig_name": photo.name}
    print("| family | origin | floor: fwd+bwd per column (ms) | handler (ms) | handler / floor | http, gradio_client (ms) "
          "| ratio | http, raw (ms) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for name, zoo in families.items():
            x = load_image(photo, get_family(name).input_size)
            columns = session.default_columns(name)
            runs = {"floor": [], "handler": [], "http": [], "raw": []}
            requests = {"http": lambda: client.predict(handle_file(str(photo)), name, "gradient", columns,
                                                       api_name="/explain"),
                        "raw": lambda: raw_explain(http, photo, name, columns, pool)}
            for _ in range(2):  # warm-up: first calls allocate, load NNCF's extension, fill caches
                floor_once(zoo, x, columns), handlers.explain(payload, name, "gradient", columns)
                requests["http"](), requests["raw"]()
            served_maps = Path(demo.GRADIO_CACHE) / MAPS_FOLDER
            for _ in range(repeats):  # interleaved, so a busy moment hits every column alike
                runs["floor"].append(floor_once(zoo, x, columns))
                # Maps are stored by content: clear them, so that every request encodes its maps.
                shutil.rmtree(handlers.maps_dir, ignore_errors=True)
                started = time.perf_counter()
                handlers.explain(payload, name, "gradient", columns)
                runs["handler"].append(time.perf_counter() - started)
                for key, request in requests.items():
                    shutil.rmtree(served_maps, ignore_errors=True)
                    started = time.perf_counter()
                    request()
                    runs[key].append(time.perf_counter() - started)
            floor, handler, via_client, raw = (median_ms(runs[k]) for k in ("floor", "handler", "http", "raw"))
            print(f"| {name} | {zoo.origin} | {floor:.1f} | {handler:.1f} | {handler / floor:.2f} | "
                  f"{via_client:.1f} | {via_client / floor:.2f} | {raw:.1f} | {raw / floor:.2f} |", flush=True)
        family = next(iter(families))
        trivial = {"gradio_client": lambda: client.predict(family, api_name="/models"),
                   "raw": lambda: _raw_call(http, "models", [family])}
        ms = {key: 1e3 * seconds for key, seconds in measure(trivial, repeats, warmup=2).items()}
        print(f"\nRound trip of a request that computes nothing (`/models`, memoised): gradio_client "
              f"{ms['gradio_client']:.1f} ms, raw {ms['raw']:.1f} ms", flush=True)
    finally:
        pool.shutdown()
        http.close()
        demo.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_answer_seconds(zoo: Path, cache: Path, extensions: Path, photo: Path) -> float:
    """Seconds from starting ``python app.py`` to the first Explain answer."""
    port = _free_port()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    command = [sys.executable, "app.py", "--zoo", str(zoo), "--source", "local", "--families", "resnet18-shapes",
               "--cache-dir", str(cache), "--port", str(port)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        while not serves_the_space(url):
            if process.poll() is not None:
                raise RuntimeError(f"python app.py exited with {process.returncode}")
            time.sleep(0.2)
        Client(url, verbose=False).predict(handle_file(str(photo)), "resnet18-shapes", "gradient",
                                           api_name="/explain")
        return time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=60)


def startup_table(zoo: Path, photo: Path, repeats: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    print("\n| start of `python app.py` | to first Explain answer (s), median | runs |")
    print("|---|---|---|")
    cold, warm = [], []
    for i in range(repeats):
        cache, extensions = work / f"cache{i}", work / f"ext{i}"
        cold.append(first_answer_seconds(zoo, cache, extensions, photo))
        warm.append(first_answer_seconds(zoo, cache, extensions, photo))
    print(f"| cold caches (fresh cache dir and torch extensions) | {statistics.median(cold):.1f} | "
          f"{', '.join(f'{s:.1f}' for s in cold)} |")
    print(f"| warm caches | {statistics.median(warm):.1f} | {', '.join(f'{s:.1f}' for s in warm)} |")
    shutil.rmtree(work, ignore_errors=True)


def fresh_machine(photo: Path, serve_after: str | None, build_steps: int | None, timeout: float = 3600) -> dict:
    """``python app.py`` with no Hub, no zoo, no weights and fresh caches: seconds to the page, to the
    first Explain answer, and until each family built in the background joins the page and is complete."""
    work = Path(tempfile.mkdtemp(prefix="bench-fresh-"))
    port = _free_port()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(work / "ext"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(work / "hf"), "TORCH_HOME": str(work / "torch"), "PIP_NO_CACHE_DIR": "1"}
    command = [sys.executable, "app.py", "--zoo", str(work / "zoo"), "--cache-dir", str(work / "cache"),
               "--port", str(port)]
    command += (["--serve-after", serve_after] if serve_after else []) + (
        ["--build-steps", str(build_steps)] if build_steps else [])
    log = work / "app.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds: dict = {}
    try:
        url = f"http://127.0.0.1:{port}"
        while not serves_the_space(url):
            if process.poll() is not None or time.perf_counter() - started > timeout:
                raise RuntimeError(f"python app.py did not serve (exit {process.poll()}); its log ends:\n{_tail(log)}")
            time.sleep(0.5)
        seconds["page"] = time.perf_counter() - started
        client = Client(url, verbose=False)
        first = DEFAULT_FAMILIES[0]
        out = client.predict(handle_file(str(photo)), first, "gradient", api_name="/explain")
        seconds["first Explain answer"] = time.perf_counter() - started
        seconds["its columns"] = ", ".join(out[i].removeprefix("### ") for i in range(0, 16, 4) if out[i])
        seconds[f"FP32's top-1 on {photo.name}"] = out[1]["label"]
        joined, complete = {}, {}
        built = [f for f in DEFAULT_BUILD if offline_available(f)]
        while len(complete) < len(built) and time.perf_counter() - started < timeout:
            for family in built:
                if family in complete:
                    continue
                try:
                    table, text = client.predict(family, api_name="/models")
                except Exception:  # still being built: not a served family yet
                    continue
                joined.setdefault(family, time.perf_counter() - started)
                if "Still training" not in text:
                    complete[family] = (time.perf_counter() - started, ", ".join(row[0] for row in table["data"]))
            if process.poll() is not None:
                raise RuntimeError(f"python app.py exited with {process.returncode}; its log ends:\n{_tail(log)}")
            time.sleep(2)
        for family in built:
            if family != first:
                seconds[f"{family} joins the page"] = joined.get(family, "not within the timeout")
            seconds[f"{family} complete"] = complete.get(family, ("not within the timeout", ""))[0]
            seconds[f"{family} variants"] = complete.get(family, (0, "-"))[1]
            directory = work / "zoo" / family
            for name in zoo_variants(directory) if directory.is_dir() else ():  # each stage's time
                metrics = read_config(directory / name)["metrics"]
                score = (f"top-1 {metrics['top1']:.1%}" if "top1" in metrics else
                         f"agreement {metrics['agreement_with_fp32']:.1%}" if "agreement_with_fp32" in metrics else "")
                seconds[f"{family}: training {name} ({score})"] = metrics["train_seconds"]
        return seconds
    finally:
        process.terminate()
        process.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def _tail(log: Path, lines: int = 30) -> str:
    """The end of a log that is deleted with its work directory."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def fresh_table(photo: Path, serve_after: str | None, build_steps: int | None, timeout: float) -> None:
    seconds = fresh_machine(photo, serve_after, build_steps, timeout)
    steps = f", every epoch cut to {build_steps} steps" if build_steps else ", the full recipes"
    print(f"\n| fresh machine (no Hub, no zoo, no weights, fresh caches; served first: "
          f"{serve_after or 'the default'}{steps}) | seconds |")
    print("|---|---|")
    for key, value in seconds.items():
        print(f"| {key} | {value:.1f} |" if isinstance(value, float) else f"| {key} | {value} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="resnet18-shapes zoo (fp32/, int8/, sparse90/); "
                                                 "without it every family uses stand-in variants")
    parser.add_argument("--families", nargs="*", default=["resnet18-shapes", "resnet18-cifar10", "resnet50-imagenet"],
                        help="families of the Explain table (none: start-up only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--startup", action="store_true", help="also time python app.py to first answer")
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--device", help="the Space's device: cpu, cuda, cuda:N or auto (env SURGERY_DEVICE; "
                                          "default auto)")
    parser.add_argument("--fresh", action="store_true",
                        help="also time python app.py on a fresh machine (builds the zoo: minutes)")
    parser.add_argument("--serve-after", help="passed to app.py with --fresh (default: the app's)")
    parser.add_argument("--build-steps", type=int, help="passed to app.py with --fresh (a smoke run of the bench)")
    parser.add_argument("--fresh-timeout", type=float, default=3600,
                        help="with --fresh, stop waiting for the background builds after this many seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    faithful(device)
    photo = photo_path(PHOTOS[1])  # chelsea
    families = {}
    for name in args.families:
        local = args.zoo and name == "resnet18-shapes"
        families[name] = (resolve(SourceConfig(families=(name,), zoo=args.zoo, source="local"))[name] if local
                          else stand_in_zoo(name))
    print(f"torch {torch.__version__}, {device}, {args.threads} threads, {os.cpu_count()} CPUs visible, load average "
          f"{os.getloadavg()[0]:.1f} at start, image {photo.name}, gradient saliency, median of {args.repeats}\n")
    if families:
        explain_table(families, photo, args.repeats, device)
    if args.startup:
        if not args.zoo:
            parser.error("--startup needs --zoo (python app.py serves a real zoo)")
        startup_table(args.zoo, photo, args.startup_repeats)
    if args.fresh:
        fresh_table(photo, args.serve_after, args.build_steps, args.fresh_timeout)


if __name__ == "__main__":
    main()
