"""The training stream (workflows.ingest): what each row holds, how runs repeat, how tiles spread.

Shards are written in the schema of `lightbsr shards` from real photographs (fixture `hr_tile`).
Most checks call `make_chunk` (the function each Ray task runs) directly; the integration tests run the
Ray Data pipeline itself, feeding two Ray Train workers from shards on a real SeaweedFS server.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lightbsr.degrade import degrade, kernel_pca_basis, prior_vector
from lightbsr.images import encode_png
from workflows import ingest, storage
from workflows.config import load_config

pytestmark = pytest.mark.unit

TILE = 32  # HR tile side in the test shards
SHARD_SIZES = (7, 5, 9, 3, 6)  # uneven on purpose; T = 30 tiles


def write_test_shards(tiles: np.ndarray, url: str, sizes=SHARD_SIZES) -> None:
    """Shards in the `lightbsr shards` schema: tile_id, image (PNG), source, x, y, height, width, sha256."""
    start = 0
    for index, size in enumerate(sizes):
        part = tiles[start : start + size]
        images = [encode_png(tile) for tile in part]
        table = pa.table(
            {
                "tile_id": pa.array(range(1000 + start, 1000 + start + size), pa.int64()),
                "image": pa.array(images, pa.binary()),
                "source": pa.array([f"photo-{start + i}.png" for i in range(size)], pa.string()),
                "x": pa.array([0] * size, pa.int32()),
                "y": pa.array([0] * size, pa.int32()),
                "height": pa.array([TILE] * size, pa.int32()),
                "width": pa.array([TILE] * size, pa.int32()),
                "sha256": pa.array([hashlib.sha256(b).hexdigest() for b in images], pa.string()),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.atomic_write_bytes(storage.join(url, f"shard-{index:05d}.parquet"), sink.getvalue().to_pybytes())
        start += size


def make_cfg(
    shards: str,
    *,
    setting: int = 1,
    seed: int = 0,
    batch: int = 6,
    iters: int = 5,
    workers: int = 1,
    epochs: int = 4,
    extra: tuple[str, ...] = (),
):
    return load_config(
        None,
        [
            f"data.shards={shards}",
            "model.scale=2",
            f"model.setting={setting}",
            "data.patch_size=8",
            f"data.tile_size={TILE}",
            f"train.batch_size={batch}",
            f"train.num_workers={workers}",
            f"schedule.iters_per_epoch={iters}",
            f"schedule.epochs={epochs}",
            "schedule.phase1_epochs=1",
            "schedule.warmup_epochs=0",
            f"train.seed={seed}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def basis() -> torch.Tensor:
    return kernel_pca_basis(seed=0, n_kernels=500)


@pytest.fixture(scope="module")
def shard_url(hr_tile, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("ingest-shards"))
    write_test_shards(hr_tile(sum(SHARD_SIZES), size=TILE), url)
    return url


def run_rows(spec: ingest.SampleSpec, samples: int) -> dict[str, np.ndarray]:
    """The first `samples` rows of a run, chunk after chunk, as the Ray tasks make them."""
    parts = [ingest.make_chunk(spec, i) for i in range(samples // spec.chunk)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def test_rows_follow_the_batch_contract(shard_url, basis):
    cfg = make_cfg(shard_url)
    for stage, views in (("teacher", 4), ("student", 1)):
        rows = ingest.make_chunk(ingest.sample_spec(cfg, stage, basis), 0)
        n = ingest.chunk_rows(cfg)
        assert rows["lr"].dtype == np.uint8 and rows["lr"].shape == (n, views, 3, 8, 8)
        assert rows["hr"].dtype == np.uint8 and rows["hr"].shape == (n, views, 3, 16, 16)
        assert rows["prior"].dtype == np.float32 and rows["prior"].shape == (n, 15)
        assert rows["noise_sigma"].dtype == np.float32 and rows["noise_sigma"].shape == (n,)
        assert rows["tile_id"].dtype == np.int64 and rows["tile_id"].shape == (n,)
    rows = ingest.make_chunk(ingest.sample_spec(make_cfg(shard_url, setting=2), "teacher", basis), 0)
    assert rows["prior"].shape == (n, 18)


def test_every_tile_appears_once_per_pass(shard_url, basis):
    cfg = make_cfg(shard_url, batch=4, iters=4)  # 16 samples per epoch, 30 tiles per pass
    spec = ingest.sample_spec(cfg, "student", basis)
    tile_ids = run_rows(spec, 4 * spec.tiles)["tile_id"]
    everything = sorted(range(1000, 1000 + spec.tiles))
    passes = tile_ids.reshape(4, spec.tiles)
    for k, tiles in enumerate(passes):
        assert sorted(tiles) == everything, f"pass {k} does not hold every tile once"
    assert len({tuple(p) for p in passes}) == 4, "every pass must take the tiles in a new order"


def test_same_seed_gives_same_samples_and_another_seed_others(shard_url, basis):
    first = run_rows(ingest.sample_spec(make_cfg(shard_url), "teacher", basis), 12)
    again = run_rows(ingest.sample_spec(make_cfg(shard_url), "teacher", basis), 12)
    other = run_rows(ingest.sample_spec(make_cfg(shard_url, seed=1), "teacher", basis), 12)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    assert not np.array_equal(first["tile_id"], other["tile_id"])
    assert not np.array_equal(first["prior"], other["prior"])


def test_each_epoch_draws_new_crops_and_degradations(shard_url, basis):
    cfg = make_cfg(shard_url, batch=6, iters=5)  # an epoch is exactly one pass over the 30 tiles
    spec = ingest.sample_spec(cfg, "teacher", basis)
    rows = run_rows(spec, 2 * spec.tiles)
    epoch0, epoch1 = (np.argsort(rows["tile_id"][e * 30 : (e + 1) * 30]) + e * 30 for e in (0, 1))
    assert (rows["tile_id"][epoch0] == rows["tile_id"][epoch1]).all()
    prior_changed = np.abs(rows["prior"][epoch0] - rows["prior"][epoch1]).max(axis=1) > 1e-4
    crops_changed = (rows["hr"][epoch0] != rows["hr"][epoch1]).any(axis=(1, 2, 3, 4))
    assert prior_changed.all(), "every tile must get a new degradation in a new epoch"
    assert crops_changed.mean() > 0.9, "nearly every tile must get new crops in a new epoch"


def test_resumed_run_sees_the_data_of_the_uninterrupted_run(shard_url, basis):
    cfg = make_cfg(shard_url)
    whole = ingest.sample_spec(cfg, "teacher", basis)
    resumed = ingest.sample_spec(cfg, "teacher", basis, start_epoch=2)
    per_epoch = ingest.rows_per_epoch(cfg) // whole.chunk
    for i in range(per_epoch):
        expected, got = ingest.make_chunk(whole, 2 * per_epoch + i), ingest.make_chunk(resumed, i)
        for key in expected:
            np.testing.assert_array_equal(expected[key], got[key], err_msg=f"chunk {i} {key}")


def test_teacher_views_share_one_degradation_and_lr_is_degrade_of_hr(shard_url, basis):
    spec = ingest.sample_spec(make_cfg(shard_url), "teacher", basis, with_kernels=True)
    rows = run_rows(spec, 12)
    kernel = torch.from_numpy(rows["kernel"])  # (n, 21, 21)
    for i in range(len(kernel)):
        hr = torch.from_numpy(rows["hr"][i]).float() / 255  # (4, 3, 16, 16)
        expected = degrade(hr, kernel[i].expand(4, -1, -1), scale=2)  # one kernel for all 4 views
        np.testing.assert_array_equal((expected * 255).round().to(torch.uint8).numpy(), rows["lr"][i])
    np.testing.assert_allclose(rows["prior"], prior_vector(kernel, basis).numpy(), rtol=1e-5, atol=1e-6)
    assert (rows["noise_sigma"] == 0).all()
    distinct_views = [len({rows["hr"][i, v].tobytes() for v in range(4)}) for i in range(len(kernel))]
    assert min(distinct_views) > 1, "the 4 views of a tile must be different crops"


def test_setting2_rows_carry_their_noise_level(shard_url, basis):
    spec = ingest.sample_spec(make_cfg(shard_url, setting=2), "student", basis, with_kernels=True)
    rows = run_rows(spec, 18)
    kernel, sigma = torch.from_numpy(rows["kernel"]), torch.from_numpy(rows["noise_sigma"])
    np.testing.assert_allclose(rows["prior"], prior_vector(kernel, basis, sigma).numpy(), rtol=1e-5, atol=1e-5)
    clean = degrade(torch.from_numpy(rows["hr"][:, 0]).float() / 255, kernel, scale=2) * 255  # (n, 3, 8, 8)
    residual = torch.from_numpy(rows["lr"][:, 0]).float() - clean
    measured = residual.flatten(1).std(dim=1)
    strong = sigma > 8  # clipping at 0 / 255 and 8-bit rounding blur the weak levels
    assert strong.sum() >= 3
    ratio = (measured[strong] / sigma[strong]).numpy()
    assert np.all((ratio > 0.6) & (ratio < 1.4)), ratio


def test_chunks_divide_the_worker_batch(shard_url):
    for batch, workers in ((64, 1), (64, 2), (48, 4), (6, 2), (10, 1)):
        cfg = make_cfg(shard_url, batch=batch, workers=workers)
        chunk = ingest.chunk_rows(cfg)
        assert (batch // workers) % chunk == 0 and chunk <= ingest.MAX_CHUNK_ROWS


def test_bad_stage_and_missing_shards_are_errors(shard_url, basis, tmp_path):
    with pytest.raises(ValueError, match="stage"):
        ingest.sample_spec(make_cfg(shard_url), "teachers", basis)
    with pytest.raises(ValueError, match=r"no shard-NNNNN\.parquet"):
        ingest.sample_spec(make_cfg(str(tmp_path)), "teacher", basis)


def shards_of_one_photograph(sample_images: Path, folder: Path):
    """`lightbsr shards` run on one real photograph (451x300 -> 7 x 4 tiles of 64) into folder/shards.

    Returns the config and the tile ids the shards hold."""
    import shutil

    from workflows.shards import write_shards

    (folder / "src").mkdir()
    shutil.copy(sample_images / "train" / "chelsea.png", folder / "src")
    cfg = make_cfg(str(folder / "shards"), batch=4, iters=7, extra=("data.tile_size=64", "data.tiles_per_shard=10"))
    manifest = write_shards(str(folder / "src"), str(folder / "shards"), cfg, progress=False)
    shards = ingest.list_shards(cfg.shards_url, cfg)
    assert [s.rows for s in shards] == [10, 10, 8] and manifest.tiles == 28
    ids = [i for s in shards for i in pq.read_table(s.url, columns=["tile_id"]).column("tile_id").to_pylist()]
    return cfg, ids


def test_stream_reads_what_lightbsr_shards_wrote(sample_images, basis, tmp_path):
    cfg, ids = shards_of_one_photograph(sample_images, tmp_path)
    rows = run_rows(ingest.sample_spec(cfg, "student", basis), 28)
    assert sorted(rows["tile_id"].tolist()) == sorted(ids)


def test_incomplete_shards_are_refused(sample_images, basis, tmp_path):
    from workflows.shards import load_manifest, save_manifest

    shards_of_one_photograph(sample_images, tmp_path)
    cfg = make_cfg(str(tmp_path / "shards"))
    manifest = load_manifest(cfg.shards_url, cfg)
    manifest.complete = False
    save_manifest(cfg.shards_url, manifest, cfg)
    with pytest.raises(ValueError, match="incomplete"):
        ingest.sample_spec(cfg, "teacher", basis)


# ----------------------------------------------------------------------------- Ray


@pytest.mark.integration
def test_ray_dataset_rows_equal_the_planned_chunks(ray_local, shard_url, basis):
    cfg = make_cfg(shard_url, batch=6, iters=2, epochs=3)
    ds = ingest.training_dataset(cfg, "teacher", basis, start_epoch=1)
    got = {key: [] for key in ("lr", "hr", "prior", "noise_sigma", "tile_id")}
    for batch in ds.iter_batches(batch_size=6, batch_format="numpy"):
        for key in got:
            got[key].append(batch[key])
    spec = ingest.sample_spec(cfg, "teacher", basis, start_epoch=1)
    expected = run_rows(spec, 2 * ingest.rows_per_epoch(cfg))
    for key in got:
        rows = np.concatenate(got[key])
        if np.issubdtype(rows.dtype, np.floating):
            # the prior is a float32 matmul (kernel @ PCA basis): a Ray worker and this process may pick
            # different CPU kernels and thread counts, and its last bit can differ (1 ulp seen here)
            np.testing.assert_allclose(rows, expected[key], rtol=1e-6, atol=1e-7, err_msg=key)
        else:  # pixels (uint8) and tile ids (int64) are exact wherever they are computed
            np.testing.assert_array_equal(rows, expected[key], err_msg=key)


def _collect_tile_ids(config: dict) -> None:
    """Train loop: take each epoch's batches, record the tile ids and shapes this worker saw."""
    import ray.train

    context = ray.train.get_context()
    shard = ray.train.get_dataset_shard("train")
    epochs: list[list[int]] = [[] for _ in range(config["epochs"])]
    shapes = set()
    batches = iter(shard.iter_torch_batches(batch_size=config["batch"]))
    for epoch in range(config["epochs"]):
        for _ in range(config["iters"]):
            batch = next(batches)
            epochs[epoch] += batch["tile_id"].tolist()
            shapes.add((tuple(batch["lr"].shape), str(batch["lr"].dtype), tuple(batch["prior"].shape)))
    leftover = sum(1 for _ in batches)
    out = Path(config["out"]) / f"rank{context.get_world_rank()}.json"
    out.write_text(json.dumps({"epochs": epochs, "shapes": [list(map(str, s)) for s in shapes], "leftover": leftover}))


@pytest.mark.integration
def test_two_train_workers_get_every_tile_once_per_epoch_from_s3(ray_local, s3_server, hr_tile, basis, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    url = f"s3://{s3_server.bucket}/ingest-test/train"
    with s3_server.environment():
        write_test_shards(hr_tile(sum(SHARD_SIZES), size=TILE), url)
        cfg = make_cfg(
            url,
            batch=6,
            iters=5,
            workers=2,
            epochs=3,
            extra=(f"storage.s3.endpoint_url={s3_server.endpoint}", "data.data_cpus=1"),
        )
        ds = ingest.training_dataset(cfg, "teacher", basis, runtime_env={"env_vars": s3_server.env()})
        spec = ingest.sample_spec(cfg, "teacher", basis)
    TorchTrainer(
        _collect_tile_ids,
        train_loop_config={"epochs": 3, "iters": 5, "batch": 3, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets={"train": ds},
        dataset_config=ingest.training_data_config(),
        run_config=RunConfig(name="ingest-split", storage_path=str(tmp_path / "ray")),
    ).fit()
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["leftover"] == 0 for r in reports), "both workers must get the same number of batches"
    assert all(r["shapes"] == [["(3, 4, 3, 8, 8)", "torch.uint8", "(3, 15)"]] for r in reports)
    everything = sorted(range(1000, 1000 + spec.tiles))
    for epoch in range(3):
        seen = reports[0]["epochs"][epoch] + reports[1]["epochs"][epoch]
        assert sorted(seen) == everything, f"epoch {epoch}: a tile is duplicated or lost"
    # chunks are dealt round-robin, so worker r's epoch is exactly chunks r, r + 2, ... of that epoch
    with s3_server.environment():
        planned = run_rows(spec, 3 * spec.tiles)["tile_id"].reshape(-1, spec.chunk)
    for rank, report in enumerate(reports):
        expected = np.concatenate(planned[rank::2]).reshape(3, -1)
        assert [list(e) for e in expected] == report["epochs"], f"rank {rank} got another share"
