"""Peak memory (RSS) of `lightbsr upscale` on one big photograph, in a subprocess per run.

    python benchmarks/upscale_memory.py                       # 4000x3000 JPEG, x4, this tree's code
    python benchmarks/upscale_memory.py --before /work/main   # also the code of another checkout

The input is a sample photograph resized to the requested size (a photograph's statistics, not
noise). The model is a x4 student with `--groups` groups of `--blocks` blocks (default 1 x 1:
the default 8 x 8 student takes hours at this size on two loaded cores, and its peak differs only
by the activations of one tile, which this run also reports). Each run is `python -m
workflows.upscale` with the default tile and overlap unless given; its peak RSS comes from
`os.wait4` (the child's own `ru_maxrss`). Writes benchmarks/results/upscale_memory.{json,md}.

Other benchmarks call `measure_upscale_peak` (one run) and `photo` / `student_checkpoint` (inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def photo(path: Path, width: int, height: int, source: Path | None = None) -> Path:
    """A `width` x `height` JPEG made from a sample photograph (bicubic resize, quality 95)."""
    if source is None:
        from lightbsr.samples import extract_samples

        cache = Path(os.environ.get("LIGHTBSR_SAMPLES_CACHE", "~/.cache/lightbsr/samples")).expanduser()
        extract_samples(cache)
        source = max((cache / "eval").glob("*.png"), key=lambda p: p.stat().st_size)
    with Image.open(source) as image:
        image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(path, quality=95)
    return path


def student_checkpoint(path: Path, n_groups: int = 1, n_blocks: int = 1, scale: int = 4) -> Path:
    """A randomly initialised student saved as our checkpoint (weights do not change memory or time)."""
    import torch

    from lightbsr.checkpoint import save_checkpoint
    from lightbsr.student import Student

    torch.manual_seed(0)
    student = Student(scale=scale, n_groups=n_groups, n_blocks=n_blocks).eval()
    config = {"scale": scale, "n_groups": n_groups, "n_blocks": n_blocks}
    return save_checkpoint(path, student, role="student", model_config=config, pca_basis=None)


def measure_upscale_peak(
    model: str | Path,
    image: Path,
    output: Path,
    tile: int | None = None,
    overlap: int | None = None,
    tree: Path = ROOT,
) -> dict:
    """Run `lightbsr upscale` from the checkout `tree` in a subprocess; its peak RSS (MiB) and wall time."""
    model, image, output = (str(Path(p).resolve()) for p in (model, image, output))
    command = [sys.executable, "-m", "workflows.upscale", "--model", model, image, output, "--quiet"]
    command += ["--tile", str(tile)] if tile else []
    command += ["--overlap", str(overlap)] if overlap is not None else []
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    log = process.stdout.read().decode(errors="replace") if process.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"upscale from {tree} failed ({status}):\n{log[-2000:]}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return {
        "tree": str(tree),
        "commit": commit.stdout.strip(),
        "peak_rss_mib": round(usage.ru_maxrss * 1024 / MIB, 1),  # Linux reports KiB
        "wall_s": round(wall, 1),
        "tile": tile,
        "overlap": overlap,
    }


def image_buffers_mib(width: int, height: int, scale: int) -> dict[str, float]:
    """The O(image) buffers of the upscale path: float LR and float SR (3 channels each), the uint8 SR,
    and Pillow's copy of an RGB image while it encodes it (4 bytes per pixel)."""
    lr, sr = width * height * 3, width * height * scale * scale * 3
    return {
        "lr_float": round(lr * 4 / MIB, 1),
        "sr_float": round(sr * 4 / MIB, 1),
        "sr_uint8": round(sr / MIB, 1),
        "sr_pillow": round(sr // 3 * 4 / MIB, 1),
    }


def buffer_arithmetic(buffers: dict[str, float]) -> list[str]:
    """What the image-sized buffers add to the interpreter's own memory, before and after the output was
    written band by band (fc6ae57 -> the band-by-band change): arithmetic from the code, not measured."""
    before = round(buffers["lr_float"] + 4 * buffers["sr_float"])
    after = round(buffers["lr_float"] + buffers["sr_uint8"])
    encode = round(buffers["sr_uint8"] + buffers["sr_pillow"])
    return [
        "Buffer arithmetic (from the code, not measured): before the band-by-band output (up to fc6ae57) the"
        f" float SR ({buffers['sr_float']} MiB) existed four times at once while `encode_picture` rounded it"
        " (the clamped picture, the clipped copy, the product by 255 and its rounding), on top of the float LR:"
        f" about {before} MiB above the interpreter. Now the float SR exists one band at a time (two rows of"
        " tiles at HR size and a few band-sized copies while a band is quantised: O(tile x width)); what grows with the image is the float LR and the one uint8"
        f" (or uint16) output, {after} MiB while the model runs, then that output plus Pillow's 4-byte-per-pixel"
        f" copy while it encodes ({encode} MiB) and the encoded file.",
        "",
    ]


def write_results(record: dict) -> None:
    """benchmarks/results/upscale_memory.{json,md} from `record` (also re-renders a saved JSON's markdown)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "upscale_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    size = f"{record['width']}x{record['height']}"
    lines = [
        "# Peak RSS of `lightbsr upscale`",
        "",
        f"{size} JPEG photograph, x{record['scale']} student of {record['n_groups']} group(s) x "
        f"{record['n_blocks']} block(s), 2 CPU cores, {record['date']}. `python benchmarks/upscale_memory.py"
        f"{record['arguments']}`",
        "",
        "| code | commit | tile / overlap | peak RSS (MiB) | wall (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, run in record["runs"].items():
        tiling = f"{run['tile'] or 'default'} / {run['overlap'] if run['overlap'] is not None else 'default'}"
        lines.append(f"| {name} | {run['commit']} | {tiling} | {run['peak_rss_mib']} | {run['wall_s']} |")
    buffers = image_buffers_mib(record["width"], record["height"], record["scale"])
    lines += [
        "",
        f"Image-sized buffers at this size (MiB): float LR {buffers['lr_float']}, float SR {buffers['sr_float']}, "
        f"uint8 SR {buffers['sr_uint8']}, Pillow's copy of the uint8 SR {buffers['sr_pillow']}.",
        "",
        *buffer_arithmetic(buffers),
    ]
    (RESULTS / "upscale_memory.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--groups", type=int, default=1, help="student groups (default 1)")
    parser.add_argument("--blocks", type=int, default=1, help="adaptation blocks per group (default 1)")
    parser.add_argument("--tile", type=int, help="LR tile side (default: the config's)")
    parser.add_argument("--overlap", type=int, help="LR overlap (default: the config's)")
    parser.add_argument("--before", type=Path, help="another checkout to measure as 'before'")
    args = parser.parse_args(argv)
    arguments = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="upscale-memory-") as work:
        folder = Path(work)
        image = photo(folder / "photo.jpg", args.width, args.height)
        model = student_checkpoint(folder / "student.pt", args.groups, args.blocks)
        runs: dict[str, dict] = {}
        record = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "arguments": f" {arguments}" if arguments else "",
            "width": args.width,
            "height": args.height,
            "scale": 4,
            "n_groups": args.groups,
            "n_blocks": args.blocks,
            "cpu_count": os.cpu_count(),
            "image_buffers_mib": image_buffers_mib(args.width, args.height, 4),
            "runs": runs,
        }
        trees = {"after": ROOT, **({"before": args.before} if args.before else {})}
        for name, tree in trees.items():
            runs[name] = measure_upscale_peak(model, image, folder / f"{name}.jpg", args.tile, args.overlap, tree)
            print(name, runs[name], flush=True)
            write_results(record)  # a finished run survives a later one that fails
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
