"""`lightbsr samples DIR`: real photographs from package wheels (see `lightbsr.samples`)."""

from __future__ import annotations

import argparse
import sys

from lightbsr.samples import SampleError, extract_samples


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lightbsr samples",
        description="Extract real sample photographs from PyPI wheels into DIR/train and DIR/eval "
        "(nothing is installed), with DIR/ATTRIBUTION naming each file's source and licence.",
    )
    parser.add_argument("dir", help="destination folder, e.g. data/samples")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    try:
        report = extract_samples(args.dir, log=log)
    except SampleError as error:
        print(f"lightbsr samples: error: {error}", file=sys.stderr)
        return 1
    print(
        f"{len(report.written)} written, {len(report.kept)} already present in {report.dest}; "
        f"sources and licences in {report.attribution}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
