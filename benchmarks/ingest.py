"""Degraded LR/HR samples per second reaching a training loop: Ray Data stream vs torch DataLoader.

Both pipelines do the same work per sample (`workflows.ingest.make_chunk`: read the shard, decode
the PNG tile, crop + flip, draw and apply a degradation) with the same CPU budget (`data.data_cpus`
= `--workers` for Ray Data, `num_workers` DataLoader workers, one torch thread per process), in the
same run, on shards that `lightbsr shards` cut from real photographs. The whole run (this process,
Ray's own processes and both pipelines' workers) is pinned to `--cpus` cores (default: as many as
`--workers`), so on a many-core machine neither pipeline borrows cores the other cannot use.

The loop stands in for a GPU step with a sleep (a GPU step leaves the CPUs free):
* tiny step (1 ms): samples/s delivered = what each pipeline can produce -> ratio ray / torch;
* paced step: a step 25 % longer than the slower pipeline needs per batch, the same for both ->
  the fraction of the loop's time spent waiting for the next batch (stalls, jitter, start-up
  excluded by the warm-up batches).

    python benchmarks/ingest.py [--cases teacher:1,student:2] [--batch 16] [--workers 2] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightbsr.degrade import kernel_pca_basis  # noqa: E402
from lightbsr.samples import extract_samples  # noqa: E402
from workflows import ingest  # noqa: E402
from workflows.config import Config, RayConfig, load_config  # noqa: E402
from workflows.runtime import init_ray  # noqa: E402
from workflows.shards import write_shards  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TINY_STEP_S = 0.001
PACE = 1.25
DRY_WAIT_S = 0.02
MIN_WARMUP_S = 5.0
MAX_DRAIN_BATCHES = 150


class ChunkDataset(Dataset):
    """Chunk i of the run, made in a DataLoader worker exactly as a Ray Data chunk maker makes it."""

    def __init__(self, spec: ingest.SampleSpec, chunks: int):
        self.spec, self.chunks = spec, chunks

    def __len__(self) -> int:
        return self.chunks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(value) for key, value in ingest.make_chunk(self.spec, index).items()}


def torch_batches(spec: ingest.SampleSpec, batch: int, chunks: int, workers: int) -> Iterator[dict]:
    loader = DataLoader(ChunkDataset(spec, chunks), batch_size=None, num_workers=workers, prefetch_factor=2)
    pending: list[dict] = []
    for chunk in loader:  # a chunk divides the batch
        pending.append(chunk)
        if sum(len(c["tile_id"]) for c in pending) == batch:
            yield {key: torch.cat([c[key] for c in pending]) for key in pending[0]}
            pending = []


def ray_batches(cfg: Config, stage: str, basis: torch.Tensor, batch: int) -> Iterator[dict]:
    ds = ingest.training_dataset(cfg, stage, basis)
    return iter(ds.iter_torch_batches(batch_size=batch, prefetch_batches=2))


def step(batch: dict[str, torch.Tensor], step_s: float) -> None:
    """The stand-in training step: copy the batch to the GPU if there is one, then sleep."""
    started = time.perf_counter()
    if torch.cuda.is_available():
        for value in batch.values():
            value.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
    time.sleep(max(0.0, step_s - (time.perf_counter() - started)))


def measure(batches: Iterable[dict], warmup: int, count: int, step_s: float, drain: bool) -> dict:
    """Run a loop of `count` steps after the warm-up; time spent in next() is waiting for data.

    The warm-up lasts `warmup` batches and MIN_WARMUP_S (worker start-up is not timed); with
    `drain` it goes on until a next() has to wait (whatever a pipeline buffered while it started
    is used up), so the timed steps see its steady production rate.
    """
    it = iter(batches)
    try:
        started = time.perf_counter()
        for done in range(warmup + MAX_DRAIN_BATCHES):
            asked = time.perf_counter()
            batch = next(it)
            dry = time.perf_counter() - asked > DRY_WAIT_S
            step(batch, step_s)
            warm = done + 1 >= warmup and time.perf_counter() - started >= MIN_WARMUP_S
            if warm and (dry or not drain):
                break
        waited, rows = 0.0, 0
        start = time.perf_counter()
        for _ in range(count):
            asked = time.perf_counter()
            batch = next(it)
            waited += time.perf_counter() - asked
            rows += len(batch["tile_id"])
            step(batch, step_s)
        total = time.perf_counter() - start
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # stops the Ray executor / the DataLoader workers before the next measurement
    return {"samples_per_s": rows / total, "wait_fraction": waited / total, "seconds": total, "batches": count}


def bench_config(shards: str, args: argparse.Namespace, stage_setting: tuple[str, int], batches_needed: int) -> Config:
    return load_config(
        None,
        [
            f"data.shards={shards}",
            f"model.setting={stage_setting[1]}",
            f"train.batch_size={args.batch}",
            "train.num_workers=1",
            f"data.data_cpus={args.workers}",
            "schedule.epochs=1",
            "schedule.phase1_epochs=0",
            "schedule.warmup_epochs=0",
            f"schedule.iters_per_epoch={batches_needed}",
        ],
    )


def run_pair(cfg: Config, stage: str, args, basis, step_s: float, batches_needed: int, drain: bool) -> dict:
    """Both pipelines, twice, in the order torch, ray, ray, torch (drift on a shared machine cancels)."""
    spec = ingest.sample_spec(cfg, stage, basis)
    chunks = batches_needed * args.batch // spec.chunk
    make = {
        "torch": lambda: torch_batches(spec, args.batch, chunks, args.workers),
        "ray": lambda: ray_batches(cfg, stage, basis, args.batch),
    }
    runs: dict[str, list[dict]] = {"torch": [], "ray": []}
    for name in ("torch", "ray", "ray", "torch"):
        runs[name].append(measure(make[name](), args.warmup, args.batches, step_s, drain))
    out = {name: _mean(results) | {"runs": results} for name, results in runs.items()}
    out["ratio_ray_over_torch"] = out["ray"]["samples_per_s"] / out["torch"]["samples_per_s"]
    return out


def _mean(results: list[dict]) -> dict:
    keys = ("samples_per_s", "wait_fraction")
    return {key: sum(r[key] for r in results) / len(results) for key in keys}


def markdown(result: dict) -> str:
    lines = [
        f"## {result['stage']} setting {result['setting']}, batch {result['batch']}, "
        f"{result['workers']} CPU processes per pipeline; {result['machine']}",
        "",
        "| loop step | pipeline | samples/s (mean; two runs) | wait fraction (mean; two runs) |",
        "| --- | --- | --- | --- |",
    ]
    for phase in ("tiny_step", "paced_step"):
        step_ms = result[phase]["step_ms"]
        for name in ("ray", "torch"):
            r = result[phase][name]
            rates = ", ".join(f"{x['samples_per_s']:.1f}" for x in r["runs"])
            waits = ", ".join(f"{100 * x['wait_fraction']:.1f}" for x in r["runs"])
            lines.append(
                f"| {step_ms:.0f} ms | {name} | {r['samples_per_s']:.1f} ({rates}) "
                f"| {100 * r['wait_fraction']:.1f} % ({waits}) |"
            )
    lines += [
        "",
        f"ratio ray / torch (tiny step): {result['tiny_step']['ratio_ray_over_torch']:.2f}; "
        f"(paced step): {result['paced_step']['ratio_ray_over_torch']:.2f}",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="teacher:1,student:2", help="stage:setting pairs, comma-separated")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="Ray Data CPUs = DataLoader workers")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="cores the whole run is pinned to (default: --workers, at most the machine's)",
    )
    parser.add_argument("--images", default=None, help="HR image folder (default: the sample photographs)")
    parser.add_argument("--machine", default=None, help="how to describe the machine in the results")
    parser.add_argument("--object-store-mb", type=int, default=RayConfig().object_store_mb)
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def pin_cpus(count: int) -> int:
    """Pin this process (and so every process it starts, Ray's included) to its first `count` cores."""
    cores = sorted(os.sched_getaffinity(0))[: max(1, count)]
    os.sched_setaffinity(0, cores)
    return len(cores)


def describe_machine(pinned: int) -> str:
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{pinned} of {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at start){gpu}"


def bench_case(stage: str, setting: int, args: argparse.Namespace, images: str, machine: str) -> dict:
    batches_needed = args.warmup + MAX_DRAIN_BATCHES + args.batches + 8  # + read-ahead
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(f"{tmp}/shards", args, (stage, setting), batches_needed)
        tiles = write_shards(images, cfg.shards_url, cfg, progress=False).tiles
        basis = kernel_pca_basis(seed=cfg.model.pca_seed)
        tiny = run_pair(cfg, stage, args, basis, TINY_STEP_S, batches_needed, drain=True)
        slower = min(tiny["ray"]["samples_per_s"], tiny["torch"]["samples_per_s"])
        paced_step_s = PACE * args.batch / slower
        paced = run_pair(cfg, stage, args, basis, paced_step_s, batches_needed, drain=False)
    return {
        "benchmark": "ingest",
        "stage": stage,
        "setting": setting,
        "batch": args.batch,
        "workers": args.workers,
        "machine": machine,
        "tiles": tiles,
        "scale": cfg.model.scale,
        "patch": cfg.data.patch_size,
        "tiny_step": {"step_ms": 1000 * TINY_STEP_S, **tiny},
        "paced_step": {"step_ms": 1000 * paced_step_s, **paced},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = args.images
    if images is None:
        cache = Path(os.environ.get("LIGHTBSR_SAMPLES_CACHE", "~/.cache/lightbsr/samples")).expanduser()
        extract_samples(cache)
        images = str(cache / "train")
    pinned = pin_cpus(args.cpus or args.workers)
    machine = args.machine or describe_machine(pinned)
    init_ray(RayConfig(num_cpus=max(4, 2 * args.workers), object_store_mb=args.object_store_mb))
    results = []
    for case in args.cases.split(","):
        stage, setting = case.split(":")
        results.append(bench_case(stage, int(setting), args, images, machine))
        print(markdown(results[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    (out / "ingest.md").write_text(
        "# ingest benchmark: Ray Data stream vs torch DataLoader\n\n" + "\n".join(markdown(r) for r in results)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
