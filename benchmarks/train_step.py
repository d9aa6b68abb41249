"""Overhead of the Ray Train loop: its samples/s against a plain PyTorch loop, same run.

Both loops train the same student objective (same network, batch, patch and in-memory degraded
examples cut from the real sample photographs) for the same epochs. The Ray figure is the
loop's own per-epoch `samples_per_s` (data from an in-memory Ray Dataset through
`iter_torch_batches`, optimiser step, loss bookkeeping; start-up, validation and checkpoint
upload are outside the epoch timer, as are the plain loop's); the first epoch of each pass is
a warm-up and is dropped, and the median of the others is compared. The plain loop runs before and after the Ray run (mean of both), so
a drift of the machine's load during the run affects both sides. Goal: ratio >= 0.95.

    python benchmarks/train_step.py [--epochs 5 --iters 12 --batch 8 --patch 16 --groups 2 --blocks 2 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightbsr.checkpoint import save_checkpoint  # noqa: E402
from lightbsr.degrade import kernel_pca_basis  # noqa: E402
from lightbsr.objectives import StudentObjective  # noqa: E402
from lightbsr.small_runs import as_float_batch, degraded_examples  # noqa: E402
from lightbsr.student import Student  # noqa: E402
from lightbsr.teacher import Teacher  # noqa: E402
from workflows.config import load_config  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in both loops (= CPUs per Ray worker); 1 is steady on a shared machine",
    )
    parser.add_argument("--images", default=str(Path.home() / ".cache/lightbsr/samples"))
    return parser.parse_args(argv)


def plain_loop(cfg, teacher: Teacher, examples, epochs: int) -> list[float]:
    """The same objective and step as the Ray loop, without Ray: samples/s per epoch."""
    torch.manual_seed(cfg.train.seed)
    student = Student(cfg.model.scale, cfg.model.n_groups, cfg.model.n_blocks)
    student.load_from_teacher(teacher)
    objective = StudentObjective(student, teacher, cfg.loss).train()
    optimizer = torch.optim.Adam(
        [p for p in objective.parameters() if p.requires_grad],
        lr=cfg.schedule.lr,
        betas=(cfg.schedule.beta1, cfg.schedule.beta2),
    )
    n, batch, rates = len(examples["lr"]), cfg.train.batch_size, []
    step = 0
    for _ in range(epochs):
        started = time.perf_counter()
        sums = {}
        for _ in range(cfg.schedule.iters_per_epoch):
            start = (step * batch) % (n - batch + 1)
            terms = objective(*as_float_batch(examples, slice(start, start + batch)), phase=2)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach()
            step += 1
        rates.append(cfg.schedule.iters_per_epoch * batch / (time.perf_counter() - started))
    return rates


def ray_loop(cfg, examples, log: Path) -> list[float]:
    import ray
    from ray.train import UserCallback

    from workflows.runtime import init_ray
    from workflows.train import train_stage

    class EpochRates(UserCallback):
        """Appends rank 0's samples/s of each reported epoch to `log` (runs in the Train controller)."""

        def after_report(self, run_context, metrics, checkpoint):
            with open(log, "a") as handle:
                handle.write(
                    f"{metrics[0]['samples_per_s']} {metrics[0]['data_wait_s'] / metrics[0]['epoch_time_s']}\n"
                )

    init_ray(cfg.ray)
    rows = [{k: v[i] for k, v in examples.items()} for i in range(len(examples["lr"]))]
    # one pass covers the whole run, as the shard stream does (no dataset restart inside an epoch)
    total = cfg.schedule.epochs * cfg.schedule.iters_per_epoch * cfg.train.batch_size
    rows = rows * -(-total // len(rows))
    # one batch per block, the layout the shard stream produces (a chunk is a divisor of the batch)
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows) // cfg.train.batch_size)
    train_stage(cfg, "student", dataset=dataset, tracking=False, callbacks=[EpochRates()])
    return [tuple(float(x) for x in line.split()) for line in log.read_text().splitlines()]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(1)
        teacher = Teacher(4, 1, args.groups, args.blocks, queue_size=64)
        model_config = {
            "scale": 4,
            "setting": 1,
            "n_groups": args.groups,
            "n_blocks": args.blocks,
            "queue_size": 64,
            "momentum": 0.999,
            "pca_seed": 0,
        }
        save_checkpoint(
            Path(root, "teacher"), teacher, role="teacher", model_config=model_config, pca_basis=kernel_pca_basis(0)
        )
        cfg = load_config(
            None,
            [
                f"storage.root={root}/store",
                f"train.teacher_checkpoint={root}/teacher",
                "data.eval_images=/nonexistent",
                f"model.n_groups={args.groups}",
                f"model.n_blocks={args.blocks}",
                "model.queue_size=64",
                f"data.patch_size={args.patch}",
                f"data.tile_size={max(64, 4 * args.patch)}",
                f"train.batch_size={args.batch}",
                f"train.cpus_per_worker={args.threads}",
                f"schedule.epochs={args.epochs}",
                "schedule.phase1_epochs=0",
                "schedule.warmup_epochs=0",
                f"schedule.iters_per_epoch={args.iters}",
                f"train.checkpoint_every_epochs={args.epochs}",
            ],
        )
        examples = degraded_examples(
            Path(args.images) / "train", 4 * args.batch, 1, args.patch, 4, kernel_pca_basis(0), seed=0
        )
        # plain before and after Ray: a machine whose load drifts during the run affects both sides
        plain = plain_loop(cfg, teacher, examples, args.epochs)
        ray_epochs = ray_loop(cfg, examples, Path(root, "ray_rates.txt"))
        ray_rates = [rate for rate, _ in ray_epochs]
        plain += plain_loop(cfg, teacher, examples, args.epochs)
    plain_sps = statistics.median(plain[1 : args.epochs] + plain[args.epochs + 1 :])
    ray_sps = statistics.median(ray_rates[1:])
    row = {
        "benchmark": "train_step",
        "model": f"student {args.groups}x{args.blocks}",
        "batch": args.batch,
        "patch": args.patch,
        "threads": args.threads,
        "epochs_timed": args.epochs - 1,
        "iters": args.iters,
        "statistic": "median",
        "plain_samples_per_s": round(plain_sps, 2),
        "ray_samples_per_s": round(ray_sps, 2),
        "ratio": round(ray_sps / plain_sps, 3),
        "plain_epochs": [round(x, 2) for x in plain],
        "ray_epochs": [round(x, 2) for x in ray_rates],
        "ray_data_wait_fraction": [round(w, 3) for _, w in ray_epochs],
    }
    print(json.dumps(row))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps(row) + "\n")
    (RESULTS / "train_step.md").write_text(
        "| loop | samples/s (median of timed epochs) |\n| --- | --- |\n"
        f"| plain PyTorch | {plain_sps:.2f} |\n| Ray Train (1 worker) | {ray_sps:.2f} |\n"
        f"| **ratio Ray / plain** | **{ray_sps / plain_sps:.3f}** (goal >= 0.95) |\n\n"
        f"{row['model']}, batch {args.batch}, LR patch {args.patch}, {args.threads} threads, "
        f"{args.epochs - 1} timed epochs x {args.iters} iterations, CPU, one run of "
        f"`python benchmarks/train_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`.\n"
    )
    return row


if __name__ == "__main__":
    main()
