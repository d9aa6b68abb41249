"""CPU inference speed of the x4 student, as a fraction of what this machine's matmul reaches.

A student forward on a 128x128 LR image and a 2048^3 float32 matmul are timed alternately
(``--pairs`` pairs); each pair gives a ratio (student MAC/s) / (matmul MAC/s), and the median
ratio is the figure to quote: load from other processes slows both halves of a pair alike.
The matmul half repeats the product so that it lasts about as long as one student forward,
so both halves see the same stretch of machine load.
Also reported: student GMAC/s and ms per output megapixel (medians over the pairs).

    python benchmarks/inference.py --label "channels_last"

appends one JSON line to benchmarks/results/inference.json and rewrites inference.md from all lines.

OpenMP threads spin while they wait at the end of each parallel op. On a shared machine with
more runnable threads than cores (ours: 2 cores, several engineers), a spinning thread burns the
time slice its partner needs, and a network of ~1,500 small ops ran 7-10x slower with 2 threads
than with 1 while one big matmul did not. So this script sets ``OMP_WAIT_POLICY=PASSIVE``
(before torch loads OpenMP) unless ``--spin`` is given or the variable is already set.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

if __name__ == "__main__" and "--spin" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from lightbsr import Student
from lightbsr.macs import count_macs

RESULTS = Path(__file__).resolve().parent / "results"
MATMUL_SIZE = 2048


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="LR height and width")
    parser.add_argument("--pairs", type=int, default=9, help="alternating (student, matmul) timing pairs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--label", default="current", help="name of the code version measured")
    parser.add_argument(
        "--student-class",
        default="lightbsr:Student",
        help="module:Class to measure, e.g. a snapshot of an older version on PYTHONPATH, for before/after figures",
    )
    parser.add_argument("--spin", action="store_true", help="keep OpenMP's default (spinning) wait policy")
    parser.add_argument("--no-save", action="store_true", help="print only; do not touch benchmarks/results")
    return parser.parse_args(argv)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def student_class(spec: str) -> type[torch.nn.Module]:
    module_name, _, class_name = spec.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def prepare_student(size: int, spec: str) -> tuple[torch.nn.Module, torch.Tensor, int]:
    torch.manual_seed(0)
    student = student_class(spec)(scale=4).eval()
    lr = torch.rand(1, 3, size, size)
    with torch.device("meta"):
        macs = count_macs(Student(scale=4).eval(), torch.empty(1, 3, size, size))
    return student, lr, macs


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    student, lr, macs = prepare_student(args.size, args.student_class)
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    matmul_macs = MATMUL_SIZE**3

    with torch.inference_mode():
        run_student = lambda: student(lr)  # noqa: E731
        run_matmul = lambda: torch.mm(a, b)  # noqa: E731
        for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
            run_student(), run_matmul()
        repeats = max(1, round(seconds(run_student) / seconds(run_matmul)))
        run_matmuls = lambda: [run_matmul() for _ in range(repeats)]  # noqa: E731
        pairs = [(seconds(run_student), seconds(run_matmuls) / repeats) for _ in range(args.pairs)]

    ratios = [(macs / ts) / (matmul_macs / tm) for ts, tm in pairs]
    student_s = statistics.median(ts for ts, _ in pairs)
    output_megapixels = (4 * args.size) ** 2 / 1e6
    return {
        "label": args.label,
        "student_class": args.student_class,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "lr_size": args.size,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin)"),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "student_gmacs": round(macs / 1e9, 3),
        "pairs": args.pairs,
        "matmul_repeats": repeats,
        "median_ratio_to_matmul": round(statistics.median(ratios), 4),
        "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4),
        "student_gmac_per_s": round(statistics.median(macs / ts / 1e9 for ts, _ in pairs), 2),
        "matmul_gmac_per_s": round(statistics.median(matmul_macs / tm / 1e9 for _, tm in pairs), 2),
        "ms_per_output_megapixel": round(1000 * student_s / output_megapixels, 1),
    }


def write_results(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    json_path = RESULTS / "inference.json"
    with json_path.open("a") as handle:
        handle.write(json.dumps(result) + "\n")
    rows = [json.loads(line) for line in json_path.read_text().splitlines() if line.strip()]
    (RESULTS / "inference.md").write_text(render_markdown(rows))


def render_markdown(rows: list[dict]) -> str:
    lines = [
        "# Student x4 CPU inference (128x128 LR), as a fraction of a 2048^3 fp32 matmul",
        "",
        "Median of alternately timed (student, matmul) pairs; written by `benchmarks/inference.py`.",
        "Rows with the default (spinning) OpenMP wait policy were taken while other engineers kept the",
        "2-core machine at load average 10-37; spinning threads then starve each other (see the script's",
        "docstring) and those ratios measure the contention, not the code. Compare PASSIVE rows.",
        "",
        "| when (UTC) | version | threads | OMP wait | median ratio | min-max | student GMAC/s | matmul GMAC/s | ms / output MP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['when']} | {row['label']} | {row['threads']} | {row.get('omp_wait_policy', 'default (spin)')} "
            f"| {row['median_ratio_to_matmul']:.3f} "
            f"| {row['ratio_min']:.3f}-{row['ratio_max']:.3f} | {row['student_gmac_per_s']} "
            f"| {row['matmul_gmac_per_s']} | {row['ms_per_output_megapixel']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = measure(args)
    print(json.dumps(result))
    if not args.no_save:
        write_results(result)


if __name__ == "__main__":
    main()
