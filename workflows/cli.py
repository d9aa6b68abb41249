"""The `lightbsr` command: one sub-command per workflow module, each also runnable as
`python -m workflows.<module>` (which is what `ray job submit` runs)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "samples": ("workflows.samples", "put real sample photographs into a folder"),
    "shards": ("workflows.shards", "cut HR images into parquet shards in object storage"),
    "train": ("workflows.train", "train the teacher and/or the student on Ray Train"),
    "tune": ("workflows.tune", "sweep loss hyper-parameters with Ray Tune + Optuna"),
    "evaluate": ("workflows.evaluate", "PSNR/SSIM tables and IDR discriminability"),
    "register": ("workflows.register", "put a trained student into the MLflow model registry"),
    "upscale": ("workflows.upscale", "upscale images with a checkpoint or a registered model"),
    "pipeline": ("workflows.pipeline", "samples/shards -> teacher -> student -> evaluate -> register"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lightbsr <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`lightbsr <command> --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lightbsr: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from workflows.runtime import set_quiet_env

    set_quiet_env()
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
