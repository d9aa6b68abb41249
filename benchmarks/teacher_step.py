"""CPU time of one teacher training step (4 views): the authors' per-view MoCo step against the joint pass.

"joint" is the objective as it was before issue 13, rebuilt here as the baseline: the query and key
encoders run once over all B*V crops (BatchNorm statistics pooled over the views), encoder input in
channels_last. "per-view" is `lightbsr.objectives.TeacherObjective`: each encoder once per view,
plus the gradient-free view-0 repeat that keeps the authors' running statistics. Both run in the
same process, alternating, forward + backward + Adam step, on the same batch.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/teacher_step.py

writes benchmarks/results/teacher_step.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lightbsr.losses import contrastive_loss, l1_255
from lightbsr.objectives import TeacherObjective
from lightbsr.teacher import Teacher

RESULTS = Path(__file__).resolve().parent / "results"
LOSSES = SimpleNamespace(contrastive_temperature=0.07, contrastive_weight=1.0, l1_weight=1.0)


class JointPassObjective(TeacherObjective):
    """The pre-issue-13 step: one query and one key pass over all B*V crops."""

    def forward(self, lr: torch.Tensor, hr: torch.Tensor, prior: torch.Tensor, phase: int) -> dict[str, torch.Tensor]:
        teacher = self.model
        batch, views = lr.shape[:2]
        flat = teacher.encoder_input(lr.flatten(0, 1), prior.repeat_interleave(views, dim=0))
        flat = flat.contiguous(memory_format=torch.channels_last)
        idr = teacher.encoder.stages(flat)
        q = teacher.head(idr).view(batch, views, -1)
        teacher.momentum_update()
        with torch.no_grad():
            k = teacher.key_head(teacher.key_encoder.stages(flat)).view(batch, views, -1)
        total = contrastive_loss(q, k, teacher.queue.clone(), LOSSES.contrastive_temperature)
        if phase == 2:
            idr0 = idr.view(batch, views, *idr.shape[1:])[:, 0]
            ca, xk = teacher.generator.convert(idr0, (lr.shape[-2], lr.shape[-1]))
            total = total + l1_255(teacher.generator.reconstruct(lr[:, 0], ca, xk), hr[:, 0])
        teacher.enqueue(k[:, 0].contiguous())
        return {"total": total}


def make(kind: str, args: argparse.Namespace) -> tuple[TeacherObjective, torch.optim.Optimizer]:
    torch.manual_seed(0)
    teacher = Teacher(4, 1, args.n_groups, args.n_blocks)
    cls = JointPassObjective if kind == "joint" else TeacherObjective
    objective = cls(teacher, LOSSES).train()
    trainable = [p for p in objective.parameters() if p.requires_grad]
    return objective, torch.optim.Adam(trainable, lr=1e-4, betas=(0.9, 0.99))


def step(objective: TeacherObjective, optimizer: torch.optim.Optimizer, batch: tuple, phase: int) -> float:
    start = time.perf_counter()
    terms = objective(*batch, phase=phase)
    optimizer.zero_grad()
    terms["total"].backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--patch", type=int, default=24, help="LR side")
    parser.add_argument("--n-groups", type=int, default=8)
    parser.add_argument("--n-blocks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(args.batch, args.views, 3, args.patch, args.patch, generator=g)
    hr = torch.rand(args.batch, args.views, 3, 4 * args.patch, 4 * args.patch, generator=g)
    batch = (lr, hr, torch.randn(args.batch, 15, generator=g))
    result: dict = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("batch", "views", "patch", "n_groups", "n_blocks")},
        "pairs": args.pairs,
        "phases": {},
    }
    for phase in (1, 2):
        runs = {kind: make(kind, args) for kind in ("joint", "per_view")}
        for objective, optimizer in runs.values():
            step(objective, optimizer, batch, phase)  # warm-up
        times: dict[str, list[float]] = {kind: [] for kind in runs}
        ratios = []
        for i in range(args.pairs):
            order = ("joint", "per_view") if i % 2 == 0 else ("per_view", "joint")
            pair = {kind: step(*runs[kind], batch, phase) for kind in order}
            for kind, seconds in pair.items():
                times[kind].append(seconds)
            ratios.append(pair["per_view"] / pair["joint"])
        result["phases"][phase] = {
            "joint_median_s": statistics.median(times["joint"]),
            "per_view_median_s": statistics.median(times["per_view"]),
            "median_ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        print(f"phase {phase}: {json.dumps(result['phases'][phase])}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "teacher_step.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"Teacher step (forward + backward + Adam), B={args.batch}, V={args.views}, LR {args.patch}x{args.patch}, "
        f"n_groups={args.n_groups}, n_blocks={args.n_blocks}, {args.threads} threads, {args.pairs} alternating pairs, "
        f"torch {torch.__version__}, {result['when']}.",
        "",
        "| phase | joint pass (s, median) | per-view, authors' step (s, median) | per-view / joint (median of pairs) | min | max |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for phase, r in result["phases"].items():
        lines.append(
            f"| {phase} | {r['joint_median_s']:.3f} | {r['per_view_median_s']:.3f} | {r['median_ratio']:.3f} "
            f"| {r['ratio_min']:.3f} | {r['ratio_max']:.3f} |"
        )
    (RESULTS / "teacher_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
