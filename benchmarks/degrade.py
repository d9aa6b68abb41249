"""Degradation throughput: HR tiles per second per core, batched vs a loop of single-image calls.

Each tile is 256x256 HR with 4 views sharing one degradation (the teacher's batch layout); the
batched path draws 16 degradations and degrades 64 views in one `degrade_views` call, the loop
draws one degradation per tile and calls `degrade` once per view, and "unfused" is the batched
path with blur and bicubic run one after the other (`blur`, then `bicubic_downsample`). All run
in the same process on the same threads, so quote the ratios. Writes
benchmarks/results/degrade.{json,md}.

    python benchmarks/degrade.py [--threads 1] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lightbsr.degrade import DegradationSampler, bicubic_downsample, blur, degrade, kernel_pca_basis

RESULTS = Path(__file__).resolve().parent / "results"
TILE = 256
VIEWS = 4
TILES_PER_CALL = 16  # 64 views per call
SCALE = 4


def batched(sampler: DegradationSampler, hr: torch.Tensor, draws: torch.Generator, noise: torch.Generator):
    drawn = sampler.sample(hr.shape[0], draws)
    return sampler.degrade_views(hr, drawn, noise)


def unfused(sampler: DegradationSampler, hr: torch.Tensor, draws: torch.Generator, noise: torch.Generator):
    """The batched pipeline without fusing blur and bicubic: one grouped conv, then two matmuls."""
    drawn = sampler.sample(hr.shape[0], draws)
    batch, views, channels, height, width = hr.shape
    blurred = blur(hr.reshape(batch, views * channels, height, width) * 255.0, drawn.kernel)
    lr = bicubic_downsample(blurred.reshape(batch * views, channels, height, width), SCALE)
    sigma = drawn.noise_sigma.repeat_interleave(views).to(lr.device).view(-1, 1, 1, 1)
    lr = lr + torch.randn(lr.shape, generator=noise, device=lr.device) * sigma
    return lr.round().clamp(0, 255) / 255.0


def looped(sampler: DegradationSampler, hr: torch.Tensor, draws: torch.Generator, noise: torch.Generator):
    out = []
    for tile in hr:  # (V, 3, H, W)
        drawn = sampler.sample(1, draws)
        sigma = drawn.noise_sigma if sampler.setting == 2 else None
        out.extend(degrade(view[None], drawn.kernel, SCALE, sigma, noise) for view in tile)
    return out


def tiles_per_second(run, sampler, hr, repeats: int) -> float:
    """Best of `repeats` timed calls; degradations drawn on CPU, noise on hr's device."""
    draws, noise = torch.Generator().manual_seed(0), torch.Generator(device=hr.device).manual_seed(0)
    run(sampler, hr, draws, noise)  # warm-up: weight-matrix cache, allocator
    if hr.is_cuda:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(sampler, hr, draws, noise)
        if hr.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return hr.shape[0] / best


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform's guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (per-core figure: 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    basis = kernel_pca_basis(seed=0)
    hr = torch.rand(TILES_PER_CALL, VIEWS, 3, TILE, TILE, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for setting in (1, 2):
        sampler = DegradationSampler(SCALE, setting, basis)
        fast = tiles_per_second(batched, sampler, hr, args.repeats)
        plain = tiles_per_second(unfused, sampler, hr, args.repeats)
        slow = tiles_per_second(looped, sampler, hr, args.repeats)
        rows.append(
            {
                "setting": setting,
                "batched_tiles_per_s": round(fast / args.threads, 2),
                "unfused_batched_tiles_per_s": round(plain / args.threads, 2),
                "loop_tiles_per_s": round(slow / args.threads, 2),
                "batched_over_loop": round(fast / slow, 2),
                "batched_over_unfused": round(fast / plain, 2),
            }
        )
        print(
            f"setting {setting}: batched {fast / args.threads:.1f} tiles/s/thread,"
            f" unfused {plain / args.threads:.1f}, loop {slow / args.threads:.1f}"
        )

    record = {
        "benchmark": "degrade",
        "scale": SCALE,
        "tile": TILE,
        "views": VIEWS,
        "views_per_call": TILES_PER_CALL * VIEWS,
        "threads": args.threads,
        "device": str(device),
        "torch": torch.__version__,
        "processor": cpu_model(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "degrade.json").write_text(json.dumps(record) + "\n")
    lines = [
        f"# degrade: x{SCALE}, {TILE}x{TILE} HR tiles, {VIEWS} views, {TILES_PER_CALL * VIEWS} views per batched call,"
        f" {args.threads} thread(s) on {device} ({record['gpu'] or record['processor']})"
        + (", tiles/s per core" if device.type == "cpu" else ""),
        "",
        "| setting | batched tiles/s | unfused batched | loop of single-image calls | batched / loop |"
        " batched / unfused |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['setting']} | {r['batched_tiles_per_s']} | {r['unfused_batched_tiles_per_s']} |"
            f" {r['loop_tiles_per_s']} | {r['batched_over_loop']} | {r['batched_over_unfused']} |"
            for r in rows
        ),
    ]
    (args.out / "degrade.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
