"""CPU inference speed per output megapixel: the authors' arithmetic (plain port), ours fp32 / bf16, onnxruntime.

    python benchmarks/inference.py                      # x4 default student, 128x128 LR, 2 threads
    python benchmarks/inference.py --profile            # also the top operators of fp32 and bf16
    python benchmarks/inference.py --memory             # also peak RSS of `lightbsr upscale` on 4000x3000

One process times every variant on the same LR image (a crop of a sample photograph), in rounds:
each round runs each variant once, in turn, so load from other processes falls on all of them
alike; figures are medians over rounds, and the speed-ups are medians of the per-round ratios.
Each variant first shows it computes the same image (PSNR against our fp32 output). Variants:

* plain: `benchmarks/plain_port.py`, the authors' arithmetic on our weights (NCHW, cats, copies);
* fp32 / bf16: `lightbsr.precision.prepare(student, precision)` through `lightbsr.tiling.upscale_tiled`;
* onnxruntime: the two graphs of `workflows.export` run by `workflows.onnx_model.OnnxModel`, tiled
  the same way (`onnxruntime_model`; the row says why when that code is not in this tree);
* matmul fp32 / bf16: a 2048^3 product, for the machine's rate in the same rounds.

Writes one JSON line to benchmarks/results/inference.json and rewrites inference.md from the lines.
OpenMP threads spin while they wait; on a shared 2-core machine that starves their partner, so the
script sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads OpenMP unless the variable is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.plain_port import plain_forward
from lightbsr.degrade import bicubic_downsample
from lightbsr.images import read_rgb
from lightbsr.macs import count_macs
from lightbsr.metrics import psnr
from lightbsr.precision import prepare
from lightbsr.samples import extract_samples
from lightbsr.student import Student
from lightbsr.tiling import upscale_tiled

RESULTS = Path(__file__).resolve().parent / "results"
MATMUL_SIZE = 2048
BIG_PHOTO = (4000, 3000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="LR height and width")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (every variant once)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--groups", type=int, default=8, help="student groups (8: the paper's model)")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per group (8: the paper's model)")
    parser.add_argument("--profile", action="store_true", help="record the top operators of fp32 and bf16")
    parser.add_argument("--memory", action="store_true", help=f"peak RSS of `lightbsr upscale` on {BIG_PHOTO}")
    parser.add_argument("--label", default="current", help="name of the code version measured")
    parser.add_argument("--no-save", action="store_true", help="print only; do not touch benchmarks/results")
    return parser.parse_args(argv)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sample_lr(size: int) -> torch.Tensor:
    """A (1, 3, size, size) LR image: the x4 bicubic reduction of a sample photograph's central crop."""
    cache = Path(os.environ.get("LIGHTBSR_SAMPLES_CACHE", "~/.cache/lightbsr/samples")).expanduser()
    extract_samples(cache)
    pixels = read_rgb(cache / "eval" / "kodim23.png")
    hr_side = 4 * size
    if min(pixels.shape[:2]) < hr_side:
        raise ValueError(f"--size {size}: the sample photograph is smaller than {hr_side} pixels")
    top, left = (pixels.shape[0] - hr_side) // 2, (pixels.shape[1] - hr_side) // 2
    hr = torch.from_numpy(pixels[top : top + hr_side, left : left + hr_side].copy()).permute(2, 0, 1)[None].float()
    return bicubic_downsample(hr, 4).round().clamp(0, 255) / 255


def trained_like_student(groups: int, blocks: int) -> Student:
    """Random weights with layer scales 0.05-0.2 (as after training), so every block's output counts."""
    torch.manual_seed(0)
    student = Student(scale=4, n_groups=groups, n_blocks=blocks).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.05 + 0.15 * torch.rand(p.shape, generator=g))
    return student


def onnxruntime_model(student: Student, folder: Path, threads: int) -> object:
    """The student exported to ONNX (`workflows.export.export_onnx`) in onnxruntime (`workflows.onnx_model`).

    Raises ImportError while this tree lacks the export; the caller then reports the row as missing.
    """
    from workflows.export import export_onnx
    from workflows.onnx_model import OnnxModel

    export_onnx(student, folder, "benchmarks/inference.py")
    return OnnxModel(folder, threads=threads)


def big_photo_peak_rss(folder: Path) -> dict:
    """Peak RSS of `lightbsr upscale` on a 4000x3000 photograph (`benchmarks/upscale_memory.py`'s runner)."""
    from benchmarks.upscale_memory import measure_upscale_peak, photo, student_checkpoint

    image = photo(folder / "big.jpg", *BIG_PHOTO)
    model = student_checkpoint(folder / "student.pt")
    return {"image": f"{BIG_PHOTO[0]}x{BIG_PHOTO[1]}", **measure_upscale_peak(model, image, folder / "out.png")}


def variants(student: Student, lr: torch.Tensor, threads: int, folder: Path) -> tuple[dict, dict]:
    """name -> zero-argument callable producing SR; name -> why a variant is missing."""
    fp32, bf16 = prepare(student, "fp32"), prepare(student, "bf16")
    plain_student = trained_like_student(len(student.generator.groups), student.generator.n_blocks)
    tile = max(lr.shape[-2:])  # one tile: the whole image, so every variant computes the same thing
    found: dict[str, Callable[[], torch.Tensor]] = {
        "plain": lambda: plain_forward(plain_student, lr),
        "fp32": lambda: upscale_tiled(fp32, lr, tile, 0),
        "bf16": lambda: upscale_tiled(bf16, lr, tile, 0),
    }
    missing: dict[str, str] = {}
    try:
        onnx = onnxruntime_model(student, folder / "onnx", threads)
        found["onnxruntime"] = lambda: upscale_tiled(onnx, lr, tile, 0)  # type: ignore[arg-type]
    except ImportError as error:
        missing["onnxruntime"] = f"not measured: {error}"
    return found, missing


def top_operators(fn: Callable[[], object], count: int = 8) -> list[dict]:
    """The operators that took the most self CPU time in one call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1000, 1),
         "share": round(e.self_cpu_time_total / total, 3)}
        for e in events[:count]
    ]  # fmt: skip


def measure(args: argparse.Namespace, folder: Path) -> dict:
    torch.set_num_threads(args.threads)
    student = trained_like_student(args.groups, args.blocks)
    lr = sample_lr(args.size)
    with torch.device("meta"):
        macs = count_macs(Student(4, args.groups, args.blocks).eval(), torch.empty(1, 3, args.size, args.size))
    found, missing = variants(student, lr, args.threads, folder)
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    a16, b16 = a.bfloat16(), b.bfloat16()  # cast once: the timed product is the bf16 kernel alone
    found_matmuls = {"matmul_fp32": lambda: a @ b, "matmul_bf16": lambda: a16 @ b16}
    with torch.inference_mode():
        reference = found["fp32"]()
        agreement = {name: round(float(psnr(fn(), reference, 4, y_channel=False)), 2) for name, fn in found.items()}
        for fn in found_matmuls.values():
            fn()
        rounds: list[dict[str, float]] = []
        for _ in range(args.rounds):
            rounds.append({name: seconds(fn) for name, fn in {**found, **found_matmuls}.items()})
        profiles = {name: top_operators(found[name]) for name in ("fp32", "bf16")} if args.profile else {}
    megapixels = (4 * args.size) ** 2 / 1e6
    per_mp = {name: round(statistics.median(r[name] for r in rounds) / megapixels, 3) for name in found}
    speedup = {
        f"{name}_vs_plain": round(statistics.median(r["plain"] / r[name] for r in rounds), 3)
        for name in found
        if name != "plain"
    }
    matmul_gmacs = {
        name: round(statistics.median(MATMUL_SIZE**3 / r[name] / 1e9 for r in rounds), 1) for name in found_matmuls
    }
    return {
        "label": args.label,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "lr_size": args.size,
        "model": f"x4 student {args.groups}x{args.blocks}",
        "student_gmacs": round(macs / 1e9, 2),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin)"),
        "load_average": round(os.getloadavg()[0], 1),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "s_per_output_megapixel": per_mp,
        "speedup_per_round_median": speedup,
        "psnr_vs_fp32_db": agreement,
        "matmul_gmac_per_s": matmul_gmacs,
        "missing": missing,
        "profile": profiles,
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
        "# Student x4 CPU inference per output megapixel (written by `benchmarks/inference.py`)",
        "",
        "Variants timed in turn in each round, one process; seconds per output megapixel are medians",
        "over rounds, speed-ups are medians of per-round ratios. PSNR: against our fp32 output.",
        "",
        "| when (UTC) | version | LR | threads | load | plain s/MP | fp32 s/MP | bf16 s/MP | onnxruntime s/MP "
        "| fp32 / plain | bf16 / plain | bf16 PSNR vs fp32 | matmul fp32 / bf16 GMAC/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        per_mp, speed = row["s_per_output_megapixel"], row["speedup_per_round_median"]
        onnx = per_mp.get("onnxruntime", "not measured")
        matmul = row["matmul_gmac_per_s"]
        lines.append(
            f"| {row['when']} | {row['label']} | {row['lr_size']} | {row['threads']} | {row['load_average']} "
            f"| {per_mp['plain']} | {per_mp['fp32']} | {per_mp['bf16']} | {onnx} "
            f"| {speed['fp32_vs_plain']}x | {speed['bf16_vs_plain']}x | {row['psnr_vs_fp32_db']['bf16']} dB "
            f"| {matmul['matmul_fp32']} / {matmul['matmul_bf16']} |"
        )
    latest = rows[-1]
    for name, ops in latest.get("profile", {}).items():
        lines += ["", f"Top operators of {name} (latest run, self CPU time):", ""]
        lines += [f"* {op['op']}: {op['share']:.0%} ({op['calls']} calls, {op['self_ms']} ms)" for op in ops]
    if latest.get("peak_rss"):
        peak = latest["peak_rss"]
        lines += ["", f"Peak RSS of `lightbsr upscale` on {peak['image']}: {peak['peak_rss_mib']} MiB ({peak})."]
    for name, why in latest.get("missing", {}).items():
        lines += ["", f"{name}: {why}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lightbsr-inference-") as folder:
        result = measure(args, Path(folder))
        if args.memory:
            try:
                result["peak_rss"] = big_photo_peak_rss(Path(folder))
            except ImportError as error:
                result["missing"]["peak_rss"] = f"not measured: {error}"
    print(json.dumps(result, indent=1))
    if not args.no_save:
        write_results(result)


if __name__ == "__main__":
    main()
