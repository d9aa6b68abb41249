"""The paper's two claims at CPU scale, on the real sample photographs (3 seeds per arm, same budget).

(a) A student aligned to a trained teacher (phase 1: channel + spatial distillation, phase 2: + L1)
    against the same student trained as long on L1 alone (loss.distillation off); both start from
    the teacher, as the recipe does, and both against bicubic: Y-PSNR on the held-out photographs,
    each blurred with its own sigma ~ U[0.2, 4] (the student is blind).
(b) The prior-constrained teacher's IDR against the same encoder trained with the same contrastive
    loss but no prior input (zeros): linear-probe accuracy and silhouette of the pooled IDRs of
    held-out patches degraded with the evaluation grid of blur sigmas (workflows.evaluate's probe),
    after phase 1 (the contrastive phase), the same number of steps for both.

    nice -n 10 env OMP_WAIT_POLICY=PASSIVE python benchmarks/claims_study.py

(the defaults: the small `Recipe`; `--lr 5e-4 --patch 16 --steps 60 240 60 240` is closer to the
quickstart pipeline) writes benchmarks/results/claims_study.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lightbsr.degrade import kernel_pca_basis
from lightbsr.images import read_rgb
from lightbsr.samples import extract_samples
from lightbsr.small_runs import (
    Recipe,
    bicubic_psnr,
    blind_blur_eval_set,
    degraded_examples,
    student_psnr,
    train_student,
    train_teacher,
)
from lightbsr.teacher import Teacher
from workflows.evaluate import IDR_SIGMAS, idr_features, probe_scores

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = Path("~/.cache/lightbsr/samples").expanduser()


class WithoutPrior:
    """The teacher's encoder fed zeros for the prior, as it was trained: a prior-free encoder for the IDR probe."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        return self.teacher.encode(lr, lr.new_zeros(lr.shape[0], self.teacher.prior_channels))


def held_out_patches(folder: Path, count: int, size: int, seed: int) -> torch.Tensor:
    """`count` random (3, size, size) crops of the held-out photographs, fixed by seed."""
    photos = sorted(folder.glob("*.png"))
    rng = np.random.default_rng(seed)
    images = [read_rgb(p) for p in photos]
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        y, x = rng.integers(0, image.shape[0] - size + 1), rng.integers(0, image.shape[1] - size + 1)
        crops.append(image[y : y + size, x : x + size])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


def probe(model: object, hr: torch.Tensor, basis: torch.Tensor, scale: int) -> dict[str, float]:
    features, labels = idr_features(model, hr, scale, basis, 1)  # type: ignore[arg-type]
    train = np.tile(np.arange(len(hr)) < len(hr) // 2, len(IDR_SIGMAS))
    return probe_scores(features, labels, train)


def one_seed(seed: int, recipe: Recipe, data: dict, basis: torch.Tensor) -> dict[str, float]:
    scale = recipe.scale
    examples = degraded_examples(SAMPLES / "train", data["examples"], 4, data["patch"], scale, basis, seed=seed)
    lr, hr = data["eval"]
    out: dict[str, float] = {}

    def probe_prior_teacher(teacher: Teacher) -> None:
        scores = probe(teacher, data["idr_patches"], basis, scale)
        out.update({f"prior_{k}": v for k, v in scores.items() if k != "chance"})

    teacher = train_teacher(examples, recipe, seed, use_prior=True, after_phase1=probe_prior_teacher)
    # control: the same teacher untrained; fed the true prior, its IDR carries the label by construction
    untrained = train_teacher(examples, dataclasses.replace(recipe, teacher_phase1=0, teacher_phase2=0), seed)
    scores = probe(untrained, data["idr_patches"], basis, scale)
    out.update({f"untrained_prior_{k}": v for k, v in scores.items() if k != "chance"})
    plain = train_teacher(examples, dataclasses.replace(recipe, teacher_phase2=0), seed, use_prior=False)
    scores = probe(WithoutPrior(plain), data["idr_patches"], basis, scale)
    out.update({f"plain_{k}": v for k, v in scores.items() if k != "chance"})
    for aligned in (True, False):
        student = train_student(examples, teacher, recipe, seed, aligned)
        out["aligned_psnr" if aligned else "unaligned_psnr"] = float(student_psnr(student, lr, hr, scale).mean())
    out["bicubic_psnr"] = float(bicubic_psnr(lr, hr, scale).mean())
    return out


def summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "mean": statistics.fmean(r[key] for r in runs),
            "std": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0,
            "min": min(r[key] for r in runs),
            "max": max(r[key] for r in runs),
        }
        for key in runs[0]
    }


ROWS = (
    ("bicubic_psnr", "(a) bicubic, Y-PSNR (dB)"),
    ("unaligned_psnr", "(a) student, no alignment (L1 only), Y-PSNR (dB)"),
    ("aligned_psnr", "(a) student aligned to the teacher, Y-PSNR (dB)"),
    ("plain_probe_accuracy", "(b) IDR probe accuracy, plain contrastive (no prior)"),
    ("prior_probe_accuracy", "(b) IDR probe accuracy, prior-constrained teacher"),
    ("untrained_prior_probe_accuracy", "(b) control: IDR probe accuracy, untrained teacher fed the prior"),
    ("plain_silhouette", "(b) IDR silhouette, plain contrastive (no prior)"),
    ("prior_silhouette", "(b) IDR silhouette, prior-constrained teacher"),
    ("untrained_prior_silhouette", "(b) control: IDR silhouette, untrained teacher fed the prior"),
)


def markdown(result: dict) -> str:
    lines = [
        f"Seeds {result['seeds']}; recipe {result['recipe']}; {result['wall_s'] / 60:.1f} min wall "
        f"({result['threads']} threads, {result['when']}).",
        "",
        "| quantity | mean | std | min | max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, label in ROWS:
        s = result["summary"][key]
        lines.append(f"| {label} | {s['mean']:.3f} | {s['std']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    lines.append(f"\nchance level of the probe: {1 / len(IDR_SIGMAS):.2f} ({len(IDR_SIGMAS)} blur sigmas)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="per seed")
    parser.add_argument("--processes", type=int, default=3, help="seeds trained at the same time")
    parser.add_argument("--examples", type=int, default=512, help="multi-view training items per seed")
    parser.add_argument("--patch", type=int, default=12, help="LR training patch side")
    parser.add_argument("--lr", type=float, default=Recipe.lr, help="Adam learning rate (constant)")
    parser.add_argument(
        "--steps",
        type=int,
        nargs=4,
        metavar=("T1", "T2", "S1", "S2"),
        default=[Recipe.teacher_phase1, Recipe.teacher_phase2, Recipe.student_phase1, Recipe.student_phase2],
        help="teacher phase 1, teacher phase 2, student phase 1, student phase 2 steps",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t1, t2, s1, s2 = args.steps
    recipe = Recipe(lr=args.lr, teacher_phase1=t1, teacher_phase2=t2, student_phase1=s1, student_phase2=s2)
    extract_samples(SAMPLES)
    basis = kernel_pca_basis(0)
    data = {
        "examples": args.examples,
        "patch": args.patch,
        "eval": blind_blur_eval_set(SAMPLES / "eval", recipe.scale, hr_side=128),
        "idr_patches": held_out_patches(SAMPLES / "eval", 24, 64, seed=0),
    }
    start = time.perf_counter()
    jobs = [(seed, recipe, data, basis, args.threads) for seed in args.seeds]
    runs: list[dict[str, float]] = []
    # one process per seed: the seeds are independent, and a shared machine gives each process its share
    with multiprocessing.get_context("spawn").Pool(min(args.processes, len(jobs))) as pool:
        for seed, run in zip(args.seeds, pool.imap(seed_in_process, jobs), strict=True):
            runs.append(run)
            print(f"seed {seed}: {json.dumps(run)} ({time.perf_counter() - start:.0f} s)", flush=True)
            write(args, recipe, runs, time.perf_counter() - start)  # after every seed: a partial run still reports


def seed_in_process(job: tuple) -> dict[str, float]:
    seed, recipe, data, basis, threads = job
    torch.set_num_threads(threads)
    return one_seed(seed, recipe, data, basis)


def write(args: argparse.Namespace, recipe: Recipe, runs: list[dict[str, float]], wall_s: float) -> None:
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seeds": args.seeds[: len(runs)],
        "threads": args.threads,
        "examples": args.examples,
        "patch": args.patch,
        "recipe": dataclasses.asdict(recipe),
        "wall_s": wall_s,
        "runs": runs,
        "summary": summary(runs),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "claims_study.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "claims_study.md").write_text(markdown(result))
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
