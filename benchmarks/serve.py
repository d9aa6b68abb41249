"""HTTP serving under load: `lightbsr serve` (Ray Serve) against `mlflow models serve`, same model, same run.

One tiny student is registered in a private `mlflow server`; both servers pull it by alias and run on
this machine, one after the other. N client threads post real photographs of mixed sizes for T
seconds to each: Ray Serve gets the PNG file (POST /upscale -> PNG), MLflow the pixels as JSON
(its protocol: POST /invocations {"inputs": ...} -> JSON). Reported per server: requests/s, p50/p99
latency, errors, and the resident memory of the server's processes sampled every 0.5 s (first,
last and peak: flat memory means last ~ first).

    python benchmarks/serve.py --clients 16 --seconds 30

writes benchmarks/results/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import requests
import torch

from lightbsr.checkpoint import save_checkpoint
from lightbsr.images import encode_png, read_rgb
from lightbsr.samples import extract_samples
from lightbsr.student import Student
from tests.fixtures.mlflow_server import free_port, start_mlflow_server, stop_process, wait_http
from workflows.config import Config, load_config
from workflows.register import register_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "lightbsr-serve-bench"
SIDES = (48, 64, 96, 128)  # LR sides of the photographs the clients send (mixed sizes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    parser.add_argument("--seconds", type=float, default=30, help="load duration per server")
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (1 CPU each)")
    parser.add_argument("--mlflow-workers", type=int, default=2, help="`mlflow models serve --workers`")
    parser.add_argument("--samples", default="~/.cache/lightbsr/samples", help="folder for `lightbsr samples`")
    parser.add_argument("--no-save", action="store_true", help="print only; do not touch benchmarks/results")
    return parser.parse_args(argv)


# ---- data, model, registry ------------------------------------------------------------------------


def photographs(folder: Path) -> list[np.ndarray]:
    """Centre crops of each real photograph, cycling through SIDES: mixed sizes, real content."""
    paths = sorted((folder / "eval").glob("*.png")) + sorted((folder / "train").glob("*.png"))
    crops = []
    for index, path in enumerate(paths):
        pixels = read_rgb(path)
        side = SIDES[index % len(SIDES)]
        top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
        crops.append(np.ascontiguousarray(pixels[top : top + side, left : left + side]))
    return crops


def tiny_student_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    student = Student(scale=2, n_groups=1, n_blocks=2).eval()
    path = folder / "student"
    model_config = {"scale": 2, "setting": 1, "n_groups": 1, "n_blocks": 2}
    save_checkpoint(path, student, role="student", model_config=model_config, pca_basis=torch.zeros(441, 15))
    return path


# ---- memory ------------------------------------------------------------------------------------


def rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def process_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def serve_processes() -> list[int]:
    """Ray Serve's own processes: the replicas, the HTTP proxy and the controller (by their titles)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ServeReplica:" in title or b"ProxyActor" in title or b"ServeController" in title:
                pids.append(int(entry.name))
    return pids


# ---- load --------------------------------------------------------------------------------------


def load(
    send: Callable[[requests.Session, int], bool], clients: int, seconds: float, pids: Callable[[], list[int]]
) -> dict:
    """`clients` threads call `send(session, i)` until `seconds` pass; memory sampled meanwhile."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(offset: int) -> None:
        session = requests.Session()
        i = offset
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                ok = send(session, i)
            except requests.RequestException:
                ok = False
            elapsed = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1
            i += 1

    memory: list[float] = []  # server RSS every 0.5 s, in MB
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        memory.append(rss_mb(pids()))
        time.sleep(0.5)
    wall = time.monotonic() - started
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1) if ordered else None,
        "rss_first_mb": round(memory[0], 1),
        "rss_last_mb": round(memory[-1], 1),
        "rss_peak_mb": round(max(memory), 1),
        "rss_quarters_mb": [round(memory[min(len(memory) - 1, len(memory) * q // 4)], 1) for q in (1, 2, 3, 4)],
        "rss_second_half_growth_mb": round(memory[-1] - memory[len(memory) // 2], 1),
    }


def bench_ray_serve(cfg: Config, images: list[bytes], args: argparse.Namespace) -> dict:
    from ray import serve

    from workflows.runtime import init_ray
    from workflows.serve import make_app

    init_ray(cfg.ray)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(make_app(f"models:/{MODEL}@champion", cfg), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/upscale"
    try:

        def send(session: requests.Session, i: int) -> bool:
            answer = session.post(url, data=images[i % len(images)], timeout=300)
            return answer.status_code == 200 and answer.content[:4] == b"\x89PNG"

        send(requests.Session(), 0)  # warm
        return load(send, args.clients, args.seconds, serve_processes)
    finally:
        serve.shutdown()


def bench_mlflow_serve(uri: str, images: list[np.ndarray], args: argparse.Namespace, workdir: Path) -> dict:
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{MODEL}@champion"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "--workers", str(args.mlflow_workers)]
    with open(workdir / "mlflow-models-serve.log", "wb") as log:
        proc = subprocess.Popen(command, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=log, stderr=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=300, proc=proc)
        bodies = [json.dumps({"inputs": image.tolist()}) for image in images]
        url = f"http://127.0.0.1:{port}/invocations"

        def send(session: requests.Session, i: int) -> bool:
            answer = session.post(
                url, data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}, timeout=300
            )
            return answer.status_code == 200 and b"predictions" in answer.content[:32]

        send(requests.Session(), 0)  # warm
        return load(send, args.clients, args.seconds, lambda: process_tree(proc.pid))
    finally:
        stop_process(proc)


def run_benchmark(args: argparse.Namespace) -> dict:
    from workflows.runtime import set_quiet_env

    set_quiet_env()
    folder = Path(args.samples).expanduser()
    extract_samples(folder)
    images = photographs(folder)
    with tempfile.TemporaryDirectory(prefix="lightbsr-serve-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        server = start_mlflow_server(workdir / "mlflow", port)
        uri = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{uri}/health", timeout=180, proc=server)
            cfg = load_config(
                None,
                [
                    f"tracking.uri={uri}",
                    "tracking.experiment=serve-bench",
                    f"tracking.registered_model={MODEL}",
                    f"serve.replicas={args.replicas}",
                    "serve.cpus_per_replica=1",
                    "ray.num_cpus=4",
                    "ray.object_store_mb=256",
                ],
            )
            register_checkpoint(str(tiny_student_checkpoint(workdir)), cfg, alias="champion")
            ray_serve = bench_ray_serve(cfg, [encode_png(image) for image in images], args)
            mlflow_serve = bench_mlflow_serve(uri, images, args, workdir)
        finally:
            stop_process(server)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "clients": args.clients,
        "seconds": args.seconds,
        "images": f"{len(images)} real photographs, LR sides {', '.join(map(str, SIDES))} px, x2 student (1 group x 2 blocks)",
        "ray_serve": {"replicas": args.replicas, "cpus_per_replica": 1, **ray_serve},
        "mlflow_models_serve": {"workers": args.mlflow_workers, **mlflow_serve},
    }


def render_markdown(result: dict) -> str:
    lines = [
        "# Serving under load: `lightbsr serve` (Ray Serve) vs `mlflow models serve`",
        "",
        f"{result['date']}, {result['machine']}; {result['clients']} concurrent clients for {result['seconds']} s "
        f"per server; {result['images']}. Written by `python benchmarks/serve.py --seconds {result['seconds']:g}`.",
        "",
        "| server | setup | requests/s | p50 ms | p99 ms | errors | RSS first / last / peak MB "
        "| RSS at 1/4, 2/4, 3/4, end MB | RSS growth, 2nd half MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for key, name, setup in (
        ("ray_serve", "Ray Serve (`lightbsr serve`)", "replicas x 1 CPU: {replicas}; PNG in, PNG out"),
        ("mlflow_models_serve", "`mlflow models serve`", "workers: {workers}; JSON pixels in and out"),
    ):
        row = result[key]
        lines.append(
            f"| {name} | {setup.format(**row)} | {row['requests_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
            f"{row['errors']} | {row['rss_first_mb']} / {row['rss_last_mb']} / {row['rss_peak_mb']} | "
            f"{', '.join(map(str, row['rss_quarters_mb']))} | {row['rss_second_half_growth_mb']} |"
        )
    lines += [
        "",
        "RSS: the server's processes (Ray Serve: replicas, HTTP proxy and controller; MLflow: the server's "
        "process tree), sampled every 0.5 s while the clients run; growth = RSS at the end minus RSS half-way.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run_benchmark(args)
    print(json.dumps(result, indent=2))
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "serve.md").write_text(render_markdown(result))


if __name__ == "__main__":
    main()
