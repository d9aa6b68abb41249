"""CPU time of one teacher training step (4 views): the authors' per-view MoCo step against the joint pass.

"joint" is the objective as it was before issue 13, rebuilt here as the baseline: the query and key
encoders run once over all B*V crops (BatchNorm statistics pooled over the views), encoder input in
channels_last ("joint_nchw": the same in NCHW, the layout the authors' step needs, see
`lightbsr.encoder`). "per_view_calls" is the first equal-to-the-authors version, rebuilt here: each encoder
called once per view, plus a gradient-free view-0 repeat for the running statistics. "batched" is
`lightbsr.objectives.TeacherObjective`'s batched path: the query encoder once over all B*V crops (NCHW) with
BatchNorm statistics per view, the key encoder once over them in channels_last with one BatchNorm call per view
(the objective itself takes per-view calls from `PER_VIEW_CALLS_MIN_PIXELS` pixels a view, chosen from these
results).
All run in the same process, in rotating order, forward + backward + Adam step, on the same batch. Each
step's wall time and process CPU time are recorded (on a shared machine the CPU time is the steadier one).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/teacher_step.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/teacher_step.py --batch 32 --patch 48 --phases 1 --rounds 12 0

write benchmarks/results/teacher_step.json and .md (the default size), or teacher_step_B32_V4_LR48.* for
another size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lightbsr.losses import contrastive_loss, l1_255
from lightbsr.objectives import TeacherObjective
from lightbsr.teacher import Teacher

RESULTS = Path(__file__).resolve().parent / "results"
LOSSES = SimpleNamespace(contrastive_temperature=0.07, contrastive_weight=1.0, l1_weight=1.0)


class PerViewCallsObjective(TeacherObjective):
    """The first issue-13 step: the query and key encoders called once per view, a view-0 repeat."""

    def forward(self, lr: torch.Tensor, hr: torch.Tensor, prior: torch.Tensor, phase: int) -> dict[str, torch.Tensor]:
        teacher, views = self.model, lr.shape[1]
        idr = [teacher.encode(lr[:, v], prior) for v in range(views)]
        q = torch.stack([teacher.head(x) for x in idr], dim=1)
        with torch.no_grad():
            teacher.encode(lr[:, 0], prior)
        teacher.momentum_update()
        k = torch.stack([teacher.embed_keys(lr[:, v], prior) for v in range(views)], dim=1)
        total = contrastive_loss(q, k, teacher.queue.clone(), LOSSES.contrastive_temperature)
        if phase == 2:
            ca, xk = teacher.generator.convert(idr[0], (lr.shape[-2], lr.shape[-1]))
            total = total + l1_255(teacher.generator.reconstruct(lr[:, 0], ca, xk), hr[:, 0])
        teacher.enqueue(k[:, 0].contiguous())
        return {"total": total}


class JointPassObjective(TeacherObjective):
    """The pre-issue-13 step: one query and one key pass over all B*V crops."""

    memory_format = torch.channels_last

    def forward(self, lr: torch.Tensor, hr: torch.Tensor, prior: torch.Tensor, phase: int) -> dict[str, torch.Tensor]:
        teacher = self.model
        batch, views = lr.shape[:2]
        flat = teacher.encoder_input(lr.flatten(0, 1), prior.repeat_interleave(views, dim=0))
        flat = flat.contiguous(memory_format=self.memory_format)
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


class JointPassNCHWObjective(JointPassObjective):
    """The joint pass in the layout the authors' step needs (NCHW): separates the layout's cost from the views'."""

    memory_format = torch.contiguous_format


class BatchedObjective(TeacherObjective):
    """`TeacherObjective`'s batched pass at every size (it switches to per-view calls on large batches)."""

    PER_VIEW_CALLS_MIN_PIXELS = sys.maxsize


KINDS: dict[str, type[TeacherObjective]] = {
    "joint": JointPassObjective,
    "joint_nchw": JointPassNCHWObjective,
    "per_view_calls": PerViewCallsObjective,
    "batched": BatchedObjective,
}


def make(kind: str, args: argparse.Namespace) -> tuple[TeacherObjective, torch.optim.Optimizer]:
    torch.manual_seed(0)
    teacher = Teacher(4, 1, args.n_groups, args.n_blocks)
    cls = KINDS[kind]
    objective = cls(teacher, LOSSES).train()
    trainable = [p for p in objective.parameters() if p.requires_grad]
    return objective, torch.optim.Adam(trainable, lr=1e-4, betas=(0.9, 0.99))


def step(
    objective: TeacherObjective, optimizer: torch.optim.Optimizer, batch: tuple, phase: int
) -> tuple[float, float]:
    """One step: (wall seconds, process CPU seconds)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    terms = objective(*batch, phase=phase)
    optimizer.zero_grad()
    terms["total"].backward()
    optimizer.step()
    return time.perf_counter() - start, time.process_time() - start_cpu


def summary(seconds: list[float]) -> dict[str, float]:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--patch", type=int, default=24, help="LR side")
    parser.add_argument("--n-groups", type=int, default=8)
    parser.add_argument("--n-blocks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, nargs=2, default=[45, 9], help="phase 1, phase 2: rounds of one step per kind"
    )
    parser.add_argument("--phases", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    args = parser.parse_args()
    default_size = (args.batch, args.views, args.patch) == (8, 4, 24)
    stem = "teacher_step" if default_size else f"teacher_step_B{args.batch}_V{args.views}_LR{args.patch}"
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
        "rounds": args.rounds,
        "phases": {},
    }
    for phase in args.phases:
        runs = {kind: make(kind, args) for kind in KINDS}
        for objective, optimizer in runs.values():
            step(objective, optimizer, batch, phase)  # warm-up
        times: dict[str, list[float]] = {kind: [] for kind in runs}
        cpu_times: dict[str, list[float]] = {kind: [] for kind in runs}
        ratios: dict[str, list[float]] = {kind: [] for kind in runs if kind != "joint"}
        cpu_ratios: dict[str, list[float]] = {kind: [] for kind in ratios}
        kinds = list(KINDS)
        for i in range(args.rounds[phase - 1]):
            order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]
            seconds = {kind: step(*runs[kind], batch, phase) for kind in order}
            for kind in runs:
                times[kind].append(seconds[kind][0])
                cpu_times[kind].append(seconds[kind][1])
            for kind in ratios:
                ratios[kind].append(seconds[kind][0] / seconds["joint"][0])
                cpu_ratios[kind].append(seconds[kind][1] / seconds["joint"][1])
        result["phases"][phase] = {
            **{f"{kind}_median_s": statistics.median(times[kind]) for kind in runs},
            **{f"{kind}_cpu_median_s": statistics.median(cpu_times[kind]) for kind in runs},
            **{f"{kind}_ratio": summary(r) for kind, r in ratios.items()},
            **{f"{kind}_cpu_ratio": summary(r) for kind, r in cpu_ratios.items()},
        }
        print(f"phase {phase}: {json.dumps(result['phases'][phase])}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"Teacher step (forward + backward + Adam), B={args.batch}, V={args.views}, LR {args.patch}x{args.patch}, "
        f"n_groups={args.n_groups}, n_blocks={args.n_blocks}, {args.threads} threads, {args.rounds[0]} / {args.rounds[1]} rounds "
        f"in phase 1 / 2 (one step of each kind per round, order rotating), torch {torch.__version__}, {result['when']}.",
        "Ratios: time / joint time within a round; median, min and max over the rounds. Wall: elapsed time; "
        "CPU: the process's CPU time (both threads), less disturbed by other load on a shared machine.",
        "",
        "| phase | clock | joint pass (s, median) | joint NCHW (s) | per-view calls (s) | batched per-view BN (s) "
        "| joint NCHW / joint | per-view calls / joint | batched / joint |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for phase, r in result["phases"].items():
        for clock, key in (("wall", ""), ("CPU", "_cpu")):
            medians = " | ".join(f"{r[f'{kind}{key}_median_s']:.3f}" for kind in KINDS)
            ratios_text = " | ".join(
                "{median:.3f} ({min:.2f}-{max:.2f})".format(**r[f"{kind}{key}_ratio"])
                for kind in KINDS
                if kind != "joint"
            )
            lines.append(f"| {phase} | {clock} | {medians} | {ratios_text} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
