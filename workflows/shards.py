"""`lightbsr shards --src SRC --dst DST`: HR images -> parquet shards of HR tiles + a manifest.

SRC and DST are local paths, `file://` or `s3://bucket/prefix` URLs. Each image is read and
validated (`lightbsr.images.read_rgb`: 8-bit RGB, fully decodable, EXIF upright, at least one
tile); a bad one is skipped and counted with its reason. Images are cut into non-overlapping
`tile_size` tiles, row-major, in sorted source order, and `tiles_per_shard` tiles make one
shard. The schema (read by `workflows.ingest`):

    <DST>/shard-00000.parquet, shard-00001.parquet, ...
      tile_id int64 (unique, stable), image binary (lossless PNG of the HR RGB tile),
      source string (path relative to SRC), x int32, y int32 (tile top-left in the source),
      height int32, width int32, sha256 string (hex digest of `image`)
    <DST>/manifest.json   counts, bytes, tiles per shard, shards, skipped files and reasons

The same input gives byte-identical shards. A shard appears only when complete (see
`workflows.storage.atomic_write_bytes`), the manifest is rewritten after every shard, and a
rerun does not rewrite the shards it lists, so a run that fails half-way resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from lightbsr.images import IMAGE_EXTENSIONS, ImageError, encode_png, read_rgb
from workflows import preflight, storage
from workflows.cli import run
from workflows.config import Config, add_config_arguments, load_config
from workflows.errors import UsageError

__all__ = ["MANIFEST_NAME", "SHARD_SCHEMA", "Manifest", "ShardEntry", "ShardsError", "main", "write_shards"]

log = logging.getLogger(__name__)

FORMAT = "lightbsr-shards/1"
MANIFEST_NAME = "manifest.json"
SHARD_SCHEMA = pa.schema(
    [
        ("tile_id", pa.int64()),
        ("image", pa.binary()),
        ("source", pa.string()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("sha256", pa.string()),
    ]
)


class ShardsError(UsageError, ValueError):
    """The sources or the destination do not allow a consistent set of shards."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


@dataclass
class ShardEntry:
    name: str
    tiles: int
    first_tile_id: int
    bytes: int  # size of the parquet file
    tile_bytes: int  # sum of the PNG tiles in it
    sha256: str  # of the parquet file


@dataclass
class Skipped:
    source: str
    reason: str  # short tag, e.g. "truncated"
    detail: str


@dataclass
class Manifest:
    tile_size: int
    tiles_per_shard: int
    sources: list[str]  # every candidate file, relative to SRC, sorted
    complete: bool = False
    images: int = 0  # sources that gave tiles
    shards: list[ShardEntry] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def tiles(self) -> int:
        return sum(s.tiles for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        body = {
            "format": FORMAT,
            "complete": self.complete,
            "tile_size": self.tile_size,
            "tiles_per_shard": self.tiles_per_shard,
            "counts": {
                "sources": len(self.sources),
                "images": self.images,
                "skipped": len(self.skipped),
                "tiles": self.tiles,
                "shards": len(self.shards),
            },
            "bytes": {"shards": self.bytes, "tiles_png": sum(s.tile_bytes for s in self.shards)},
            "shards": [asdict(s) for s in self.shards],
            "skipped": [asdict(s) for s in self.skipped],
            "sources": self.sources,
        }
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, name: str) -> Manifest:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as error:
            raise ShardsError(f"{name} is not valid JSON: {error}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ShardsError(f"{name} is not a {FORMAT} manifest")
        try:
            return cls(
                tile_size=body["tile_size"],
                tiles_per_shard=body["tiles_per_shard"],
                sources=body["sources"],
                complete=body["complete"],
                images=body["counts"]["images"],
                shards=[ShardEntry(**s) for s in body["shards"]],
                skipped=[Skipped(**s) for s in body["skipped"]],
            )
        except (KeyError, TypeError) as error:
            raise ShardsError(f"{name} is an incomplete shard manifest: {error}") from None


@dataclass
class Tile:
    tile_id: int
    source: str
    x: int
    y: int
    pixels: np.ndarray  # (T, T, 3) uint8


def list_sources(src: str, cfg: Config) -> list[tuple[str, str]]:
    """`(relative name, URL)` of every image file under SRC (or SRC itself when it is a file)."""
    try:
        names = storage.list_files(src, cfg.storage.s3)
    except FileNotFoundError:
        raise ShardsError(f"--src {storage.redact(src)} does not exist") from None
    if names == [""]:
        return [(src.rstrip("/").rsplit("/", 1)[-1], src)]
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.rsplit("/", 1)[-1].startswith(".")]
    if not images:
        raise ShardsError(f"--src {storage.redact(src)} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [(name, storage.join(src, name)) for name in images]


def cut_tiles(pixels: np.ndarray, size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Non-overlapping (size, size, 3) tiles, row-major; the right and bottom remainders are dropped."""
    height, width, _ = pixels.shape
    for y in range(0, height - size + 1, size):
        for x in range(0, width - size + 1, size):
            yield x, y, pixels[y : y + size, x : x + size]


def encode_shard(tiles: list[Tile]) -> tuple[bytes, int]:
    """Parquet bytes of one shard (deterministic) and the total size of its PNG tiles."""
    images = [encode_png(t.pixels) for t in tiles]
    table = pa.table(
        {
            "tile_id": [t.tile_id for t in tiles],
            "image": images,
            "source": [t.source for t in tiles],
            "x": [t.x for t in tiles],
            "y": [t.y for t in tiles],
            "height": [t.pixels.shape[0] for t in tiles],
            "width": [t.pixels.shape[1] for t in tiles],
            "sha256": [hashlib.sha256(b).hexdigest() for b in images],
        },
        schema=SHARD_SCHEMA,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        row_group_size=len(tiles),
        use_dictionary=["source"],
        write_statistics=["tile_id", "x", "y"],
    )
    return sink.getvalue().to_pybytes(), sum(len(b) for b in images)


class ShardWriter:
    """Collects tiles and writes each full shard once, skipping those an earlier run finished."""

    def __init__(
        self,
        dst: str,
        manifest: Manifest,
        finished: dict[str, ShardEntry],
        cfg: Config,
        on_shard: Callable[[ShardEntry], None] | None,
    ):
        self.dst = dst
        self.manifest = manifest
        self.finished = finished
        self.cfg = cfg
        self.on_shard = on_shard
        self.pending: list[Tile] = []
        self.next_tile_id = 0
        self.written = 0

    def add(self, source: str, x: int, y: int, pixels: np.ndarray) -> None:
        self.pending.append(Tile(self.next_tile_id, source, x, y, pixels))
        self.next_tile_id += 1
        if len(self.pending) == self.manifest.tiles_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = shard_name(len(self.manifest.shards))
        entry = self.finished.get(name)
        if entry is None or (entry.first_tile_id, entry.tiles) != (self.pending[0].tile_id, len(self.pending)):
            entry = self._write(name)
        self.manifest.shards.append(entry)
        self.pending = []
        save_manifest(self.dst, self.manifest, self.cfg)
        if self.on_shard is not None:
            self.on_shard(entry)

    def _write(self, name: str) -> ShardEntry:
        data, tile_bytes = encode_shard(self.pending)
        storage.atomic_write_bytes(storage.join(self.dst, name), data, self.cfg.storage.s3)
        self.written += 1
        return ShardEntry(
            name=name,
            tiles=len(self.pending),
            first_tile_id=self.pending[0].tile_id,
            bytes=len(data),
            tile_bytes=tile_bytes,
            sha256=hashlib.sha256(data).hexdigest(),
        )


def save_manifest(dst: str, manifest: Manifest, cfg: Config) -> None:
    storage.atomic_write_bytes(storage.join(dst, MANIFEST_NAME), manifest.to_json().encode(), cfg.storage.s3)


def load_manifest(dst: str, cfg: Config) -> Manifest | None:
    url = storage.join(dst, MANIFEST_NAME)
    try:
        text = storage.read_bytes(url, cfg.storage.s3).decode()
    except FileNotFoundError:
        return None
    return Manifest.from_json(text, storage.redact(url))


def finished_shards(dst: str, previous: Manifest | None, fresh: Manifest, cfg: Config) -> dict[str, ShardEntry]:
    """Shards of an earlier run with the same settings and sources that are still in place, whole."""
    if previous is None:
        return {}
    settings = ("tile_size", "tiles_per_shard", "sources")
    changed = [s for s in settings if getattr(previous, s) != getattr(fresh, s)]
    if changed:
        raise ShardsError(
            f"{storage.redact(dst)} already holds shards made with other {', '.join(changed)}; "
            "choose another --dst or delete that folder"
        )
    finished = {}
    for entry in previous.shards:
        try:
            in_place = storage.size(storage.join(dst, entry.name), cfg.storage.s3) == entry.bytes
        except FileNotFoundError:
            in_place = False
        if in_place:
            finished[entry.name] = entry
    return finished


def write_shards(
    src: str,
    dst: str,
    cfg: Config,
    *,
    progress: bool = True,
    on_shard: Callable[[ShardEntry], None] | None = None,
) -> Manifest:
    """Cut the images under `src` into shards under `dst`; return the manifest (also in `dst`).

    When `src` is a single file, a bad image raises `ImageError` instead of being skipped.
    `on_shard` is called after each shard is in place (progress reporting, tests).
    """
    sources = list_sources(src, cfg)
    single_file = len(sources) == 1 and sources[0][1] == src
    manifest = Manifest(cfg.data.tile_size, cfg.data.tiles_per_shard, [name for name, _ in sources])
    previous = load_manifest(dst, cfg)
    finished = finished_shards(dst, previous, manifest, cfg)
    if previous is not None and previous.complete and len(finished) == len(previous.shards):
        log.info("%s is complete (%d shards); nothing to do", storage.redact(dst), len(finished))
        return previous
    writer = ShardWriter(dst, manifest, finished, cfg, on_shard)
    bar = tqdm(sources, desc="shards", unit="image", disable=not progress, file=sys.stderr)
    for name, url in bar:
        label = storage.redact(url) if single_file else name
        try:
            pixels = read_rgb(storage.read_bytes(url, cfg.storage.s3), name=label, min_size=cfg.data.tile_size)
        except ImageError as error:
            if single_file:
                raise
            log.warning("skipped %s: %s: %s", name, error.reason, error.detail)
            manifest.skipped.append(Skipped(name, error.reason, error.detail))
            continue
        manifest.images += 1
        for x, y, tile in cut_tiles(pixels, cfg.data.tile_size):
            writer.add(name, x, y, tile)
        bar.set_postfix(tiles=writer.next_tile_id, shards=len(manifest.shards), skipped=len(manifest.skipped))
    writer.flush()
    bar.close()
    manifest.complete = True
    save_manifest(dst, manifest, cfg)
    log.info(
        "%d shards (%d written now), %d tiles, %d skipped",
        len(manifest.shards),
        writer.written,
        manifest.tiles,
        len(manifest.skipped),
    )
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lightbsr shards",
        description="Validate HR images and cut them into parquet shards of HR tiles plus manifest.json. "
        "SRC and DST are local paths, file:// or s3://bucket/prefix URLs (S3 credentials from the environment).",
    )
    parser.add_argument("--src", help="image folder or file (default: data.train_images)")
    parser.add_argument("--dst", help="shard folder (default: data.shards or <storage.root>/shards/train)")
    add_config_arguments(parser)
    parser.add_argument("--tile-size", type=int, help="HR tile side (data.tile_size)")
    parser.add_argument("--tiles-per-shard", type=int, help="tiles per shard (data.tiles_per_shard)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def preflight_skips(args: argparse.Namespace, cfg: Config) -> tuple[str, ...]:
    """Config keys `shards` does not use: only the source and destination (when not given as options)."""
    skip = ["data.eval_images", "data.benchmarks", "train.teacher_checkpoint", "tracking.uri", "ray"]
    if args.src:
        skip.append("data.train_images")
    if args.dst:
        skip += ["data.shards", "storage.root"]
    elif cfg.data.shards:
        skip.append("storage.root")
    return tuple(skip)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.tile_size is not None:
        overrides.append(f"data.tile_size={args.tile_size}")
    if args.tiles_per_shard is not None:
        overrides.append(f"data.tiles_per_shard={args.tiles_per_shard}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    cfg = load_config(args.config, overrides)
    preflight.check(cfg, skip=preflight_skips(args, cfg))
    src, dst = args.src or cfg.data.train_images, args.dst or cfg.shards_url
    try:
        manifest = write_shards(src, dst, cfg, progress=not args.quiet)
    except ImageError as error:
        raise UsageError(str(error)) from None
    print(
        f"{manifest.tiles} tiles in {len(manifest.shards)} shards ({manifest.bytes} bytes) from "
        f"{manifest.images} images, {len(manifest.skipped)} skipped -> {storage.redact(dst)}"
    )
    for item in manifest.skipped:
        print(f"  skipped {item.source}: {item.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="lightbsr shards"))
