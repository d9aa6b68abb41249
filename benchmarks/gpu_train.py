"""Training throughput of both stages at the paper's size: iterations/s and peak GPU memory.

Self-contained (no Ray, no shards): HR patches are random crops of smooth synthetic images made
on the device, degraded on the device by `lightbsr.degrade` (blur + bicubic + 8-bit rounding,
one degradation per item shared by its views) every step, so the data cost is inside the
timing as it would be in a GPU-side pipeline. Each stage runs its real objective (teacher:
4 views, contrastive + L1; student: frozen teacher targets + L1 + alignment) in phase 2 for at
most `--seconds` after a warm-up, with autocast in the chosen precision.

    python benchmarks/gpu_train.py                       # H100/H200: batch 64, patch 64, bf16, 8x8
    python benchmarks/gpu_train.py --device cpu --batch 2 --patch 16 --seconds 5 --groups 1 --blocks 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightbsr.degrade import DegradationSampler, kernel_pca_basis
from lightbsr.objectives import StudentObjective, TeacherObjective
from lightbsr.small_runs import LossWeights
from lightbsr.student import Student
from lightbsr.teacher import Teacher

PAPER_LOSSES = LossWeights()  # the paper's loss settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patch", type=int, default=64, help="LR patch side")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--views", type=int, default=4, help="teacher views per item")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    parser.add_argument("--seconds", type=float, default=120.0, help="timed seconds per stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per stage")
    parser.add_argument("--stages", default="teacher,student")
    parser.add_argument("--out", help="JSON lines file (default $OUT/gpu_train.json, else stdout only)")
    return parser.parse_args(argv)


class SyntheticPhotos:
    """Smooth random images on the device (low-frequency noise + edges), cropped per view."""

    def __init__(self, side: int, device: torch.device, count: int = 32, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        coarse = torch.rand(count, 3, side // 16 + 1, side // 16 + 1, generator=g)
        smooth = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
        edges = (torch.rand(count, 1, side // 4, side // 4, generator=g) > 0.5).float()
        edges = F.interpolate(edges, size=(side, side), mode="nearest")
        self.images = (0.7 * smooth + 0.3 * edges).clamp(0, 1).to(device)  # (N, 3, side, side)

    def views(self, batch: int, views: int, hr_side: int, generator: torch.Generator) -> torch.Tensor:
        """(B, V, 3, hr, hr): V crops of one image per item."""
        n, _, side, _ = self.images.shape
        index = torch.randint(n, (batch,), generator=generator)
        offsets = torch.randint(side - hr_side + 1, (batch, views, 2), generator=generator)
        crops = [
            [self.images[index[b], :, y : y + hr_side, x : x + hr_side] for y, x in offsets[b].tolist()]
            for b in range(batch)
        ]
        return torch.stack([torch.stack(c) for c in crops])


def degraded_batch(
    photos: SyntheticPhotos,
    sampler: DegradationSampler,
    args,
    views: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    hr = photos.views(args.batch, views, args.patch * args.scale, generator)
    degradation = sampler.sample(args.batch, generator)
    lr = sampler.degrade_views(hr, degradation)  # on hr's device
    return lr, hr, degradation.prior.to(device)


def make_objective(stage: str, args, device: torch.device):
    teacher = Teacher(args.scale, 1, args.groups, args.blocks)
    if stage == "teacher":
        return TeacherObjective(teacher, PAPER_LOSSES).to(device).train()
    student = Student(args.scale, args.groups, args.blocks)
    student.load_from_teacher(teacher)
    return StudentObjective(student, teacher, PAPER_LOSSES).to(device).train()


def run_stage(stage: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    objective = make_objective(stage, args, device)
    optimizer = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=2e-4, betas=(0.9, 0.99))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16" and device.type == "cuda")
    sampler = DegradationSampler(args.scale, 1, kernel_pca_basis(0))
    photos = SyntheticPhotos(args.patch * args.scale * 2, device)
    generator = torch.Generator().manual_seed(1)
    views = args.views if stage == "teacher" else 1

    def step() -> float:
        lr, hr, prior = degraded_batch(photos, sampler, args, views, generator, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            terms = objective(lr, hr, prior, phase=2)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        return terms["total"].detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    iterations, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        loss = step()
        iterations += 1
        if iterations % 10 == 0:
            sync()
    sync()
    elapsed = time.perf_counter() - started
    return {
        "stage": stage,
        "iterations": iterations,
        "seconds": round(elapsed, 2),
        "it_per_s": iterations / elapsed,
        "samples_per_s": iterations * args.batch / elapsed,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "final_loss": float(loss),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for stage in args.stages.split(","):
        row = {
            "benchmark": "gpu_train",
            "device": name,
            "batch": args.batch,
            "patch": args.patch,
            "scale": args.scale,
            "groups": args.groups,
            "blocks": args.blocks,
            "precision": args.precision,
            "torch": torch.__version__,
            **run_stage(stage, args, device),
        }
        memory = f"{row['peak_memory_gib']:.2f} GiB" if row["peak_memory_gib"] is not None else "n/a"
        print(
            f"{stage}: {row['it_per_s']:.3f} it/s, {row['samples_per_s']:.1f} samples/s, peak {memory} "
            f"({row['iterations']} its in {row['seconds']} s)",
            flush=True,
        )
        rows.append(row)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_train.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
