"""`lightbsr samples DIR`: real photographs from package wheels (see `lightbsr.samples`)."""

from __future__ import annotations

import argparse
import sys

from lightbsr.samples import SampleError, extract_samples
from workflows.cli import run
from workflows.errors import RuntimeFailure

DESCRIPTION = (
    "Extract real sample photographs from PyPI wheels into DIR/train and DIR/eval "
    "(nothing is installed), with DIR/ATTRIBUTION naming each file's source and licence."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lightbsr samples", description=DESCRIPTION)
    parser.add_argument("dir", help="destination folder, e.g. data/samples")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """No config, so no preflight: the only input is the destination folder. A failed download is exit 1."""
    args = parse_args(argv)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    try:
        report = extract_samples(args.dir, log=log)
    except SampleError as error:
        raise RuntimeFailure(str(error)) from None
    print(
        f"{len(report.written)} written, {len(report.kept)} already present in {report.dest}; "
        f"sources and licences in {report.attribution}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="lightbsr samples"))
