"""Images per second of `lightbsr upscale` on a folder: the Ray Data batch vs the one-at-a-time loop.

Both run in the same process on the same real photographs (crops of the sample images, LR side
`--size`) with the same student (random weights, `--groups` x `--blocks`, x`--scale`), writing to
local folders; their outputs are compared byte for byte. The loop is `workflows.upscale.upscale_all`
(model load + one image after the other in this process); the batch is
`workflows.batch.upscale_batch` on a local Ray (`--actors` actors of `--actor-cpus` CPUs), timed from
the call to the last write, so actor start-up and the model load in each actor are included;
starting Ray itself is reported apart. Run it with OMP_WAIT_POLICY=PASSIVE on a quiet machine.

    python benchmarks/batch_upscale.py [--images 16] [--size 96] [--actors 2] [--cpus 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightbsr.checkpoint import save_checkpoint  # noqa: E402
from lightbsr.images import read_rgb  # noqa: E402
from lightbsr.samples import extract_samples  # noqa: E402
from lightbsr.student import Student  # noqa: E402
from workflows.batch import upscale_batch  # noqa: E402
from workflows.config import load_config  # noqa: E402
from workflows.runtime import init_ray  # noqa: E402
from workflows.upscale import upscale_all  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=96, help="LR side of each photo crop")
    parser.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--out", type=Path, default=RESULTS / "batch_upscale")
    return parser.parse_args()


def photos(folder: Path, count: int, size: int) -> None:
    """`count` distinct size x size crops of the sample photographs as PNG files in `folder`."""
    samples = Path(os.environ.get("LIGHTBSR_SAMPLES_CACHE", "~/.cache/lightbsr/samples")).expanduser()
    extract_samples(samples)  # files already in place are kept
    made = 0
    for path in sorted((samples / "eval").glob("*.png")) + sorted((samples / "train").glob("*.png")):
        pixels = read_rgb(path)
        for y in range(0, pixels.shape[0] - size + 1, size):
            for x in range(0, pixels.shape[1] - size + 1, size):
                Image.fromarray(pixels[y : y + size, x : x + size]).save(folder / f"img{made:03d}.png")
                made += 1
                if made == count:
                    return
    raise SystemExit(f"only {made} crops of {size} px in the samples, {count} asked")


def main() -> int:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="lightbsr-batch-bench-"))
    (work / "in").mkdir()
    photos(work / "in", args.images, args.size)
    torch.manual_seed(0)
    model = Student(scale=args.scale, n_groups=args.groups, n_blocks=args.blocks).eval()
    checkpoint = save_checkpoint(
        work / "student.pt",
        model,
        role="student",
        model_config={"scale": args.scale, "n_groups": args.groups, "n_blocks": args.blocks},
        pca_basis=None,
    )
    cfg = load_config(
        None,
        [
            f"ray.num_cpus={args.cpus}",
            "ray.object_store_mb=300",
            f"evaluate.actors={args.actors}",
            f"evaluate.actor_cpus={args.actor_cpus}",
            "evaluate.use_gpu=false",
        ],
    )

    start = time.perf_counter()
    upscale_all(str(checkpoint), str(work / "in"), str(work / "loop"), cfg, device="cpu", progress=False)
    loop_s = time.perf_counter() - start

    start = time.perf_counter()
    init_ray(cfg.ray)
    ray_init_s = time.perf_counter() - start
    start = time.perf_counter()
    report = upscale_batch(str(checkpoint), str(work / "in"), str(work / "batch"), cfg, progress=False)
    batch_s = time.perf_counter() - start
    if report.failed or len(report.written) != args.images:
        raise SystemExit(f"the batch did not write every image: {report.summary()}")

    names = sorted(p.name for p in (work / "in").iterdir())
    identical = all((work / "loop" / n).read_bytes() == (work / "batch" / n).read_bytes() for n in names)
    result = {
        "images": args.images,
        "lr_size": args.size,
        "model": {"scale": args.scale, "n_groups": args.groups, "n_blocks": args.blocks},
        "batch": {"actors": args.actors, "actor_cpus": args.actor_cpus, "ray_cpus": args.cpus},
        "loop_s": round(loop_s, 2),
        "loop_images_per_s": round(args.images / loop_s, 3),
        "batch_s": round(batch_s, 2),
        "batch_images_per_s": round(args.images / batch_s, 3),
        "ray_init_s": round(ray_init_s, 2),
        "speedup": round(loop_s / batch_s, 2),
        "outputs_identical": identical,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 1),
        },
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(
        "| path | images | seconds | images/s |\n| --- | --- | --- | --- |\n"
        f"| one-at-a-time loop (this process) | {args.images} | {loop_s:.2f} | {args.images / loop_s:.3f} |\n"
        f"| Ray Data batch ({args.actors} actors x {args.actor_cpus:g} CPU) | {args.images} | {batch_s:.2f} | "
        f"{args.images / batch_s:.3f} |\n\n"
        f"x{args.scale} student {args.groups}x{args.blocks}, {args.images} real photo crops of {args.size} px, "
        f"outputs identical: {identical}; Ray start-up ({ray_init_s:.1f} s) not counted in the batch time; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end (`benchmarks/batch_upscale.py`).\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
