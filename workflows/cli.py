"""The `lightbsr` command: one sub-command per workflow module, each also runnable as
`python -m workflows.<module>` (which is what `ray job submit` runs)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from workflows.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, RuntimeFailure, UsageError
from workflows.urls import redact_text

COMMANDS = {
    "samples": ("workflows.samples", "put real sample photographs into a folder"),
    "shards": ("workflows.shards", "cut HR images into parquet shards in object storage"),
    "train": ("workflows.train", "train the teacher and/or the student on Ray Train"),
    "tune": ("workflows.tune", "sweep loss hyper-parameters with Ray Tune + Optuna"),
    "evaluate": ("workflows.evaluate", "PSNR/SSIM tables and IDR discriminability"),
    "register": ("workflows.register", "put a trained student into the MLflow model registry"),
    "upscale": ("workflows.upscale", "upscale images with a checkpoint or a registered model"),
    "export": ("workflows.export", "export a student to ONNX (two graphs for tiled inference)"),
    "serve": ("workflows.serve", "an HTTP upscaling endpoint on Ray Serve for a registered model"),
    "pipeline": ("workflows.pipeline", "samples/shards -> teacher -> student -> evaluate -> register"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lightbsr <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`lightbsr <command> --help` describes each command."]
    return "\n".join(lines)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, prog: str = "lightbsr") -> int:
    """Call a command's `main` and turn what it raises into one line on stderr and an exit code.

    The one error path of every command (`lightbsr X` and `python -m workflows.X`); see
    `workflows.errors` for the codes. Messages are redacted: no URL userinfo reaches the terminal.
    """
    try:
        return int(main(argv) or EXIT_OK)
    except UsageError as error:
        print(f"{prog}: error: {redact_text(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeFailure, OSError) as error:
        print(f"{prog}: failed: {redact_text(str(error))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lightbsr: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    from workflows.runtime import set_quiet_env

    set_quiet_env()
    module = importlib.import_module(COMMANDS[name][0])
    return run(module.main, rest, prog=f"lightbsr {name}")


if __name__ == "__main__":
    sys.exit(main())
