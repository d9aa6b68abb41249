"""GPU inference and training speed: ms per image at KDSR's 180x320 LR, teacher and student train it/s.

    python benchmarks/gpu_inference.py                  # H100/H200: x4 8x8 student, 180x320 LR, batch 1
    python benchmarks/gpu_inference.py --device cpu --height 24 --width 32 --groups 1 --blocks 1 \
        --iters 2 --train-seconds 2 --no-compile --no-save   # smoke run of the script itself

Inference variants, each on the same LR batch, timed with the device synchronised around each call
(median of `--iters` after `--warmup` untimed calls):

* fp32: the student in channels_last, eager;
* bf16: `lightbsr.precision.prepare(student, "bf16", device)` (autocast, fp32 input/output layers);
* bf16 + compile: the same prepared model's low-precision network under `torch.compile`.

Each reports ms per image, output megapixels per second and the PSNR of its output against fp32.
Training: `benchmarks/gpu_train.py`'s step (bf16 autocast, the paper's batch 64, LR patch 64) for
`--train-seconds` per stage. Writes benchmarks/results/gpu_inference.json (one JSON line per run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import gpu_train
from lightbsr.metrics import psnr
from lightbsr.precision import prepare
from lightbsr.student import Student

RESULTS = Path(__file__).resolve().parent / "results"
KDSR_LR = (180, 320)  # KDSR's reported inference size (LR height, width)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--height", type=int, default=KDSR_LR[0], help="LR height")
    parser.add_argument("--width", type=int, default=KDSR_LR[1], help="LR width")
    parser.add_argument("--batch", type=int, default=1, help="images per inference call")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20, help="timed inference calls per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant (and compilation)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--train-seconds", type=float, default=60.0, help="timed seconds per training stage (0: skip)")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--train-patch", type=int, default=64, help="LR patch side for training")
    parser.add_argument("--no-save", action="store_true", help="print only; do not touch benchmarks/results")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], torch.Tensor], device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of one call in ms, the device synchronised before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def inference_variants(student: Student, device: torch.device, compile_: bool) -> dict[str, Callable]:
    """name -> callable LR -> SR."""
    fp32 = student.to(device).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    bf16 = prepare(student, "bf16", device)
    found: dict[str, Callable] = {"fp32": fp32, "bf16": bf16}
    if compile_:
        network = torch.compile(bf16.low)  # the prepared low-precision student; islands stay fp32

        def compiled(lr: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return network(lr).float()

        found["bf16+compile"] = compiled
    return found


def measure_inference(args: argparse.Namespace, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    student = Student(4, args.groups, args.blocks).eval()
    lr = torch.rand(args.batch, 3, args.height, args.width, device=device)
    megapixels = args.batch * 16 * args.height * args.width / 1e6
    rows = []
    with torch.inference_mode():
        variants = inference_variants(student, device, not args.no_compile)
        reference = variants["fp32"](lr)
        for name, fn in variants.items():
            ms = timed_ms(lambda fn=fn: fn(lr), device, args.iters, args.warmup)
            agreement = float(psnr(fn(lr).float().cpu(), reference.cpu(), 4, y_channel=False).min())
            rows.append(
                {
                    "variant": name,
                    "ms_per_call": round(ms, 2),
                    "ms_per_image": round(ms / args.batch, 2),
                    "output_mp_per_s": round(megapixels / (ms / 1000), 2),
                    "psnr_vs_fp32_db": round(agreement, 2),
                }
            )
            print(f"{name}: {ms / args.batch:.2f} ms/image, {rows[-1]['output_mp_per_s']} MP/s", flush=True)
    return rows


def measure_training(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Teacher and student train it/s with gpu_train's step (bf16 autocast)."""
    train_args = gpu_train.parse_args(
        [
            f"--device={device}",
            f"--batch={args.train_batch}",
            f"--patch={args.train_patch}",
            f"--groups={args.groups}",
            f"--blocks={args.blocks}",
            f"--seconds={args.train_seconds}",
            "--precision=bf16",
        ]
    )
    rows = []
    for stage in ("teacher", "student"):
        row = gpu_train.run_stage(stage, train_args, device)
        print(f"train {stage}: {row['it_per_s']:.3f} it/s", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {
        "benchmark": "gpu_inference",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "lr": [args.height, args.width],
        "batch": args.batch,
        "model": f"x4 student {args.groups}x{args.blocks}",
        "inference": measure_inference(args, device),
        "training": measure_training(args, device) if args.train_seconds > 0 else [],
    }
    print(json.dumps(result))
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        with (RESULTS / "gpu_inference.json").open("a") as handle:
            handle.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
