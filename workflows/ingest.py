"""Ray Data pipeline: degraded LR/HR training batches streamed from parquet shards.

Training stream. Sample g = 0, 1, 2, ... of a run is fixed by the config alone:

* epoch e holds samples [e R, (e + 1) R), R = `rows_per_epoch(cfg)` (iterations x global batch);
* pass k = g // T (T = tiles in the shards) holds every tile exactly once: the shards in a seeded
  order, taken SHARD_WINDOW at a time, the tiles of a window shuffled together (so a chunk reads
  a few shards, not one shard per tile, yet a batch mixes tiles of several shards);
* sample g's crops, flips and degradation are drawn from generators seeded by
  (train.seed, epoch, g, tile_id): a new draw every epoch, the same draw in every run.

The dataset of a run that starts at epoch e0 is `range(chunks)` -> one `ChunkMaker` call per chunk of
`chunk_rows(cfg)` consecutive samples (read the shards it needs, decode, crop, degrade; CPU
only, within `data.data_cpus`) -> rows. Chunks keep their order (preserve_order) and a per-worker
batch is a whole number of chunks, so Ray Train's streaming split (equal=True) deals them out
round-robin and every worker's epoch e is exactly its share of samples [e R, (e + 1) R):
a run resumed at an epoch boundary sees exactly the data the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lightbsr.degrade import Degradation, DegradationSampler
from lightbsr.images import read_rgb
from workflows import storage
from workflows.config import Config, S3Config
from workflows.shards import load_manifest

__all__ = [
    "SampleSpec",
    "ShardInfo",
    "chunk_rows",
    "list_shards",
    "make_chunk",
    "pass_slots",
    "rows_per_epoch",
    "sample_spec",
    "training_data_config",
    "training_dataset",
]

Stage = Literal["teacher", "student"]

SHARD_NAME = re.compile(r"^shard-\d+\.parquet$")
#: shards whose tiles are shuffled together within a pass (a chunk reads at most this many).
SHARD_WINDOW = 4
#: upper bound on the samples in one chunk (a chunk is also a divisor of the worker batch).
#: A chunk costs Ray Data ~15 ms of CPU besides its work (2-core machine), so a chunk should take
#: several hundred ms: 32 student samples of setting 2 take ~250 ms, 32 four-view teacher samples
#: ~450 ms. The transient float copy of a teacher chunk of 32 (x4, patch 64) is ~100 MB.
MAX_CHUNK_ROWS = 32
#: tiles of recently read shards kept per Ray worker process (a window's shards are reused).
SHARD_CACHE_SIZE = 2 * SHARD_WINDOW
#: decode + degrade actors per CPU of `data.data_cpus` (see `_maker_pool`).
MAKERS_PER_DATA_CPU = 2
#: domain tags, so the noise generator never shares a stream with a sample's generator.
_SAMPLE_TAG, _NOISE_TAG, _PASS_TAG = 0, 1, 2


# ----------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class ShardInfo:
    url: str
    rows: int


def list_shards(url: str, cfg: Config) -> tuple[ShardInfo, ...]:
    """The shards under `url` with their tile counts, from its manifest.json (or, when a folder has
    no manifest, from the `shard-NNNNN.parquet` files and their parquet footers).

    An incomplete manifest (`lightbsr shards` still running or stopped) is an error, so a run
    never trains on a fraction of the data without saying so.
    """
    manifest = load_manifest(url, cfg)
    if manifest is not None:
        if not manifest.complete:
            raise ValueError(
                f"{storage.redact(url)}: the shards are incomplete (manifest.json says so); "
                "rerun `lightbsr shards` to finish them"
            )
        shards = tuple(ShardInfo(storage.join(url, e.name), e.tiles) for e in manifest.shards if e.tiles > 0)
    else:
        names = [name for name in storage.list_files(url, cfg.storage.s3) if SHARD_NAME.match(name)]
        shards = tuple(
            ShardInfo(storage.join(url, name), _footer_rows(storage.join(url, name), cfg.storage.s3)) for name in names
        )
    if not shards:
        raise ValueError(
            f"{storage.redact(url)}: no shard-NNNNN.parquet files with tiles (run `lightbsr shards` first)"
        )
    return shards


def _footer_rows(url: str, s3_cfg: S3Config) -> int:
    fs, path = storage.filesystem(url, s3_cfg)
    footer = storage.retrying("read the footer of", url, lambda: pq.ParquetFile(path, filesystem=fs).metadata, s3_cfg)
    return int(footer.num_rows)


@functools.lru_cache(maxsize=SHARD_CACHE_SIZE)
def _read_shard(url: str, s3_json: str) -> pa.Table:
    s3_cfg = S3Config.model_validate_json(s3_json)
    fs, path = storage.filesystem(url, s3_cfg)
    return storage.retrying(
        "read", url, lambda: pq.read_table(path, filesystem=fs, columns=["tile_id", "image"]), s3_cfg
    )


# ----------------------------------------------------------------------------- sample plan


@dataclass(frozen=True)
class SampleSpec:
    """Everything a chunk maker needs to make any sample of the run (small; shipped to each maker)."""

    shards: tuple[ShardInfo, ...]
    s3_json: str
    seed: int
    scale: int
    setting: int
    basis: torch.Tensor  # (441, 15) kernel PCA basis
    patch: int  # LR patch side
    views: int
    rows_per_epoch: int
    chunk: int
    first_sample: int  # global index of the run's first sample (start_epoch x rows_per_epoch)
    with_kernels: bool = False

    @property
    def tiles(self) -> int:
        return sum(shard.rows for shard in self.shards)


def rows_per_epoch(cfg: Config) -> int:
    """Samples per epoch: `schedule.iters_per_epoch` iterations of `train.batch_size`."""
    return cfg.schedule.iters_per_epoch * cfg.train.batch_size


def chunk_rows(cfg: Config) -> int:
    """Samples per chunk: the largest divisor of the per-worker batch up to MAX_CHUNK_ROWS.

    Dividing the per-worker batch is what keeps epochs aligned under the round-robin split; with a
    [min, max] range of workers it divides the per-worker batch of every count in the range.
    """
    per_worker = math.gcd(*(cfg.train.batch_size // n for n in cfg.train.worker_counts))
    return max(d for d in range(1, min(per_worker, MAX_CHUNK_ROWS) + 1) if per_worker % d == 0)


def sample_spec(
    cfg: Config,
    stage: Stage,
    basis: torch.Tensor,
    start_epoch: int = 0,
    shards: tuple[ShardInfo, ...] | None = None,
    with_kernels: bool = False,
) -> SampleSpec:
    """The spec of a run's training samples; `with_kernels` adds each row's blur kernel (for checks)."""
    if stage not in ("teacher", "student"):
        raise ValueError(f"stage: expected 'teacher' or 'student', got {stage!r}")
    if cfg.train.seed < 0:
        raise ValueError(f"train.seed: expected a seed >= 0, got {cfg.train.seed}")
    if not 0 <= start_epoch < cfg.schedule.epochs:
        raise ValueError(
            f"start_epoch: expected 0 <= start_epoch < schedule.epochs ({cfg.schedule.epochs}), got {start_epoch}"
        )
    s3_cfg = cfg.storage.s3
    shards = shards if shards is not None else list_shards(cfg.shards_url, cfg)
    return SampleSpec(
        shards=shards,
        s3_json=s3_cfg.model_dump_json(),
        seed=cfg.train.seed,
        scale=cfg.model.scale,
        setting=cfg.model.setting,
        basis=basis.detach().to("cpu", torch.float32),
        patch=cfg.data.patch_size,
        views=cfg.data.views if stage == "teacher" else 1,
        rows_per_epoch=rows_per_epoch(cfg),
        chunk=chunk_rows(cfg),
        first_sample=start_epoch * rows_per_epoch(cfg),
        with_kernels=with_kernels,
    )


@functools.lru_cache(maxsize=4)
def pass_slots(shard_rows: tuple[int, ...], seed: int, pass_index: int) -> np.ndarray:
    """(T, 2) int64 [shard index, row in shard] of every tile, in the order pass `pass_index` takes them."""
    rng = np.random.default_rng([seed, pass_index, _PASS_TAG])
    order = rng.permutation(len(shard_rows))
    windows = []
    for start in range(0, len(order), SHARD_WINDOW):
        window = order[start : start + SHARD_WINDOW]
        slots = np.concatenate([np.stack([np.full(shard_rows[k], k), np.arange(shard_rows[k])], 1) for k in window])
        windows.append(slots[rng.permutation(len(slots))])
    return np.concatenate(windows).astype(np.int64)


def _slots_of(spec: SampleSpec, samples: np.ndarray) -> np.ndarray:
    """Global sample indices (n,) -> (n, 2) [shard index, row]."""
    shard_rows = tuple(shard.rows for shard in spec.shards)
    passes, positions = np.divmod(samples, spec.tiles)
    out = np.empty((len(samples), 2), dtype=np.int64)
    for k in np.unique(passes):
        mask = passes == k
        out[mask] = pass_slots(shard_rows, spec.seed, int(k))[positions[mask]]
    return out


def _load_tiles(spec: SampleSpec, slots: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode the tiles at `slots` (n, 2) -> n uint8 (H, W, 3) arrays and their tile ids (n,)."""
    images, tile_ids = [], np.empty(len(slots), dtype=np.int64)
    for i, (shard_index, row) in enumerate(slots):
        shard = spec.shards[shard_index]
        table = _read_shard(shard.url, spec.s3_json)
        tile_ids[i] = table.column("tile_id")[int(row)].as_py()
        name = f"{storage.redact(shard.url)} row {row} (tile {tile_ids[i]})"
        images.append(read_rgb(table.column("image")[int(row)].as_py(), name))
    return images, tile_ids


# ----------------------------------------------------------------------------- augmentation + degradation


def _sample_seed(spec: SampleSpec, sample: int, tile_id: int) -> np.random.SeedSequence:
    epoch = sample // spec.rows_per_epoch
    return np.random.SeedSequence([spec.seed, epoch, sample, int(tile_id), _SAMPLE_TAG])


def _torch_generator(seed_sequence: np.random.SeedSequence) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed_sequence.generate_state(1, dtype=np.uint64)[0] >> 1))


def _augmented_views(tile: np.ndarray, size: int, views: int, rng: np.random.Generator, name: str) -> np.ndarray:
    """`views` random size x size crops of an (H, W, 3) tile, each flipped / transposed at random.

    -> uint8 (V, 3, size, size)
    """
    height, width = tile.shape[:2]
    if height < size or width < size:
        raise ValueError(f"{name}: a {width}x{height} tile is smaller than the HR patch {size}x{size}")
    out = np.empty((views, 3, size, size), dtype=np.uint8)
    for v in range(views):
        top, left = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
        hflip, vflip, transpose = rng.integers(0, 2, size=3)
        patch = tile[top : top + size, left : left + size]
        if hflip:
            patch = patch[:, ::-1]
        if vflip:
            patch = patch[::-1]
        if transpose:
            patch = patch.transpose(1, 0, 2)
        out[v] = patch.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return out


def _stack_degradations(items: list[Degradation]) -> Degradation:
    fields = dataclasses.fields(Degradation)
    return Degradation(**{f.name: torch.cat([getattr(d, f.name) for d in items]) for f in fields})


def make_chunk(spec: SampleSpec, chunk_index: int) -> dict[str, np.ndarray]:
    """The rows of chunk `chunk_index` of the run (pure function of spec and index; runs in a chunk maker).

    lr uint8 (n, V, 3, p, p), hr uint8 (n, V, 3, p*s, p*s), prior float32 (n, P),
    noise_sigma float32 (n,) on the 0..255 scale, tile_id int64 (n,) [, kernel float32 (n, 21, 21)].
    """
    start = spec.first_sample + chunk_index * spec.chunk
    samples = np.arange(start, start + spec.chunk, dtype=np.int64)
    tiles, tile_ids = _load_tiles(spec, _slots_of(spec, samples))
    hr_size = spec.patch * spec.scale
    hr, degradations = [], []
    sampler = DegradationSampler(spec.scale, spec.setting, spec.basis)
    for tile, sample, tile_id in zip(tiles, samples, tile_ids):
        crop_seed, degradation_seed = _sample_seed(spec, int(sample), int(tile_id)).spawn(2)
        hr.append(_augmented_views(tile, hr_size, spec.views, np.random.default_rng(crop_seed), f"tile {tile_id}"))
        degradations.append(sampler.sample(1, _torch_generator(degradation_seed)))
    hr_views = torch.from_numpy(np.stack(hr))  # (n, V, 3, P, P) uint8
    degradation = _stack_degradations(degradations)
    noise = _torch_generator(np.random.SeedSequence([spec.seed, int(start), _NOISE_TAG]))
    with torch.inference_mode():
        lr = sampler.degrade_views(hr_views.float() / 255.0, degradation, noise)  # (n, V, 3, p, p) in [0, 1]
    rows = {
        "lr": (lr * 255.0).round().to(torch.uint8).numpy(),
        "hr": hr_views.numpy(),
        "prior": degradation.prior.to(torch.float32).numpy(),
        "noise_sigma": degradation.noise_sigma.to(torch.float32).numpy(),
        "tile_id": tile_ids,
    }
    if spec.with_kernels:
        rows["kernel"] = degradation.kernel.numpy()
    return rows


def _chunks_to_rows(batch: dict[str, np.ndarray], spec: SampleSpec) -> dict[str, np.ndarray]:
    parts = [make_chunk(spec, int(index)) for index in batch["id"]]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


# ----------------------------------------------------------------------------- Ray Data


def _execution_options():
    """Chunks leave in order (what keeps epochs aligned under the round-robin split).

    No `resource_limits`: a global CPU cap is shared out fairly over every operator, so the
    tiny chunk-id operators in front would hold CPUs the decode + degrade makers need (in our
    runs the map then ran about one chunk at a time); the CPU budget is the maker pool's.
    """
    from ray.data import ExecutionOptions

    return ExecutionOptions(preserve_order=True)


class ChunkMaker:
    """A Ray Data actor that makes chunks; a long-lived process keeps its shard cache and skips
    the setup Ray Data repeats for every task (~30 ms of CPU a chunk on 2 cores; ~15 with actors)."""

    def __init__(self, spec: SampleSpec) -> None:
        self.spec = spec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _chunks_to_rows(batch, self.spec)


def _maker_pool(cfg: Config) -> dict[str, Any]:
    """map_batches arguments: MAKERS_PER_DATA_CPU chunk makers per CPU of `data.data_cpus`.

    Each maker reserves 1 / MAKERS_PER_DATA_CPU of a CPU, so the pool as a whole reserves exactly
    `data.data_cpus`. Two per CPU keep each CPU busy across the gaps between one chunk and the
    next (Ray Data notices finished work on a 100 ms tick; a maker also waits on its shard reads):
    with one per CPU a 2-CPU pool kept about one CPU busy (`benchmarks/ingest.py`). The pool has a
    fixed size: Ray Data's autoscaling pool grew too slowly (the stream ran at half speed for the
    whole benchmark). Ray Data starts the makers without waiting for all of them and works with
    those that have started, so on a busy cluster (a sweep's concurrent trials) the stream still
    moves with one free share of a CPU.
    """
    from ray.data import ActorPoolStrategy

    makers = max(1, round(cfg.data.data_cpus * MAKERS_PER_DATA_CPU))
    return {"num_cpus": cfg.data.data_cpus / makers, "compute": ActorPoolStrategy(size=makers)}


def training_dataset(
    cfg: Config,
    stage: Stage,
    basis: torch.Tensor,
    start_epoch: int = 0,
    *,
    epochs: int | None = None,
    shards: tuple[ShardInfo, ...] | None = None,
    with_kernels: bool = False,
    runtime_env: dict | None = None,
):
    """The `ray.data.Dataset` of training rows from `start_epoch` to the end of the schedule.

    Consume it once per run (the loop counts `schedule.iters_per_epoch` batches of
    `train.batch_size // train.num_workers` rows per epoch); pass `training_data_config()` to
    the TorchTrainer so Train keeps the chunk order set here. `epochs` limits the stream;
    `runtime_env` goes to the decode + degrade makers (e.g. S3 settings for workers started
    without them; Ray shows a runtime_env in its dashboard, so prefer the workers' own AWS chain).
    """
    import ray.data

    spec = sample_spec(cfg, stage, basis, start_epoch, shards, with_kernels)
    stop_epoch = cfg.schedule.epochs if epochs is None else min(cfg.schedule.epochs, start_epoch + epochs)
    if stop_epoch <= start_epoch:
        raise ValueError(f"epochs: expected at least one epoch from {start_epoch}, got {epochs}")
    chunks = (stop_epoch - start_epoch) * spec.rows_per_epoch // spec.chunk
    maker_env: dict[str, Any] = {"runtime_env": runtime_env} if runtime_env else {}
    ds = (
        ray.data.range(chunks, override_num_blocks=max(1, min(chunks, 4 * (stop_epoch - start_epoch))))
        .repartition(target_num_rows_per_block=1)  # one chunk per block -> one chunk per call
        .map_batches(
            ChunkMaker,
            batch_size=1,
            batch_format="numpy",
            fn_constructor_kwargs={"spec": spec},
            **_maker_pool(cfg),
            **maker_env,
        )
    )
    ds.context.execution_options = _execution_options()
    return ds


def training_data_config():
    """The `ray.train.DataConfig` that keeps the chunk order under Train (Train would replace it).

    Shard locality is off: it would deal chunks to workers by node, breaking the round-robin
    that aligns epochs (the cost is a cross-node copy of LR/HR patches, small next to a step).
    """
    from ray.train import DataConfig

    return DataConfig(execution_options=_execution_options(), enable_shard_locality=False)
