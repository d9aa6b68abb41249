"""`lightbsr evaluate`: the paper's PSNR/SSIM tables on the benchmarks present, and IDR discriminability.

Scoring runs as Ray Data batch inference on an actor pool (GPU actors when the cluster has
GPUs), or with `--local` in this process; both call the same `Scorer`, so their numbers are
identical. Each (image, degradation case) row carries the HR file's bytes, so actors need no
shared filesystem. Big images go through the tiled inference of `lightbsr.tiling`.

Everything (tables, per-image scores, the IDR projection plot) is written to `--out` and logged
to MLflow (`cfg.tracking_uri`, experiment `cfg.tracking.experiment`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightbsr.checkpoint import CheckpointError, load_checkpoint
from lightbsr.degrade import bicubic_upsample, degrade, kernel_pca_basis
from lightbsr.images import IMAGE_EXTENSIONS, ImageError, decode_picture
from lightbsr.macs import count_parameters
from lightbsr.metrics import psnr, ssim
from lightbsr.precision import PRECISIONS, prepare
from lightbsr.protocols import DegradationCase, get_protocol
from lightbsr.student import Student
from lightbsr.teacher import Teacher
from lightbsr.tiling import upscale_tiled
from workflows import preflight, storage
from workflows.cli import run
from workflows.config import Config, S3Config, add_config_arguments, load_config
from workflows.errors import UsageError
from workflows.references import RegistryError, fetch_checkpoint
from workflows.register import OURS
from workflows.urls import redact

__all__ = [
    "BICUBIC",
    "OURS",
    "PUBLISHED",
    "Evaluation",
    "Scorer",
    "benchmark_rgb",
    "benchmark_sets",
    "build_tables",
    "collect_items",
    "evaluate_model",
    "idr_discriminability",
    "idr_images",
    "main",
    "probe_scores",
    "read_sets",
    "sample_images",
    "score_local",
    "score_with_ray",
]

log = logging.getLogger(__name__)

BICUBIC = "Bicubic"
SAMPLES_SET = "samples"
PAPER_SETS = ("Set5", "Set14", "B100", "Urban100")
IDR_SIGMAS = (0.6, 1.4, 2.2, 3.0, 3.8)  # the degradation grid of the discriminability probe

# Spec section 5: published x4 Y-PSNR (dB); iso_x4 per case, gaussian8 as the mean over its cases.
_ISO_CASES = ("sigma1.2", "sigma2.4", "sigma3.6")
# fmt: off
PUBLISHED: dict[str, dict[str, dict[str, Any]]] = {
    "iso_x4": {
        "Bicubic [published]": {"params": "-", "psnr": {
            "Set5": (27.30, 25.12, 23.40), "Set14": (25.24, 23.83, 22.57),
            "B100": (25.42, 24.20, 23.15), "Urban100": (22.68, 21.62, 20.65)}},
        "DASR (CVPR 21) [published]": {"params": "5.8M", "psnr": {
            "Set5": (31.92, 31.75, 30.59), "Set14": (28.45, 28.28, 27.45),
            "B100": (27.52, 27.43, 26.83), "Urban100": (25.69, 25.44, 24.66)}},
    },
    "gaussian8": {
        "KDSRs-M (ICLR 23) [published]": {
            "params": "5.80M", "mean_psnr": {"Set5": 32.02, "Set14": 28.46, "B100": 27.52, "Urban100": 25.96}},
    },
}
# fmt: on


# ----------------------------------------------------------------------------- bicubic baseline


# ----------------------------------------------------------------------------- scoring


def benchmark_sets(root: str, s3_cfg: S3Config | None = None) -> dict[str, dict[str, str]]:
    """`{set name: {image name: URL}}` for every `<root>/<set>/HR/<image>` (PNG, JPEG, ..., any mode), on any storage.

    Any folder name is a set; the paper's sets come first in the paper's order, then the others
    by name. An error naming `root` if it does not exist or holds no such images.
    """
    try:
        names = storage.list_files(root, s3_cfg)
    except FileNotFoundError:
        raise UsageError(f"benchmarks: {redact(root)} does not exist") from None
    sets: dict[str, dict[str, str]] = {}
    for name in names:
        parts = name.split("/")
        if len(parts) == 3 and parts[1] == "HR" and parts[2].lower().endswith(IMAGE_EXTENSIONS):
            sets.setdefault(parts[0], {})[parts[2]] = storage.join(root, name)
    if not sets:
        raise UsageError(f"benchmarks: {redact(root)} holds no <set>/HR/ images ({', '.join(IMAGE_EXTENSIONS)})")
    return {name: sets[name] for name in sorted(sets, key=_set_order)}


def sample_images(cfg: Config, required: bool) -> dict[str, str]:
    """`{image name: URL}` of `data.eval_images`; when not `required`, a missing folder is a logged skip."""
    url = cfg.data.eval_images
    try:
        names = storage.list_images(url, cfg.storage.s3)
    except FileNotFoundError:
        if required:
            raise UsageError(f"data.eval_images: {redact(url)} does not exist") from None
        log.warning("data.eval_images: %s does not exist; scoring the benchmarks only", redact(url))
        return {}
    if not names:
        raise UsageError(f"data.eval_images: {redact(url)} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return {name: storage.join(url, name) for name in names}


def read_sets(cfg: Config, benchmarks: str | None) -> dict[str, dict[str, bytes]]:
    """`{set: {image name: file bytes}}` of the benchmark sets and (`evaluate.samples`) the evaluation
    images, read through `workflows.storage`; each is decoded once here, so a bad file is named
    before any scoring starts."""
    root = benchmarks or cfg.data.benchmarks
    urls = benchmark_sets(root, cfg.storage.s3) if root else {}
    if cfg.evaluate.samples:
        if SAMPLES_SET in urls:
            raise UsageError(f"benchmarks: {SAMPLES_SET!r} is the evaluation images' set; rename that folder")
        samples = sample_images(cfg, required=not urls)
        if samples:
            urls[SAMPLES_SET] = samples
    if not urls:
        raise UsageError(
            "nothing to evaluate: no benchmarks (data.benchmarks or --benchmarks) and evaluate.samples is off"
        )
    sets: dict[str, dict[str, bytes]] = {}
    for set_name, images in urls.items():
        sets[set_name] = {}
        for image, url in images.items():
            data = storage.read_bytes(url, cfg.storage.s3)
            _decoded(data, redact(url))
            sets[set_name][image] = data
    return sets


def benchmark_rgb(data: bytes, name: str) -> np.ndarray:
    """A benchmark image as float32 RGB (H, W, 3) in [0, 1], read as the authors read them: gray copied
    to three channels, alpha dropped; palette, CMYK, 16-bit and EXIF-rotated files as `decode_picture`."""
    return decode_picture(data, name).rgb


def _decoded(data: bytes, name: str) -> np.ndarray:
    """`benchmark_rgb`, its refusal turned into the command's usage error."""
    try:
        return benchmark_rgb(data, name)
    except ImageError as error:
        raise UsageError(str(error)) from None


def collect_items(sets: dict[str, dict[str, bytes]], protocols: list[str]) -> list[dict[str, Any]]:
    """One row per (set, image, protocol), carrying the HR file's bytes (the scorer runs every case)."""
    return [
        {"set": set_name, "image": image, "protocol": get_protocol(name).name, "data": data}
        for set_name, images in sets.items()
        for image, data in images.items()
        for name in protocols
    ]


class Scorer:
    """Ray Data callable class (one model per actor): a batch of item rows -> their Y-PSNR/SSIM.

    Also called directly for `--local`, so both paths run exactly the same arithmetic.
    """

    def __init__(
        self,
        checkpoint: bytes,
        tile: int,
        overlap: int,
        crop: int | None = None,
        device: str | None = None,
        precision: str = "fp32",
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with tempfile.TemporaryDirectory(prefix="lightbsr-scorer-") as folder:
            path = Path(folder, "model.pt")
            path.write_bytes(checkpoint)
            self.loaded = load_checkpoint(path, map_location=self.device)
        self.student = self.loaded.model.to(self.device)
        self.model = prepare(self.student, precision, self.device)  # what scores; float32 in and out
        self.tile, self.overlap, self.crop = tile, overlap, crop

    def score(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """One image under every case of its protocol -> one result row per case."""
        key = f"{item['set']}/{item['image']}"
        pixels = benchmark_rgb(bytes(item["data"]), key)  # (H, W, 3) float32 in [0, 1]
        if self.crop:
            pixels = pixels[: self.crop, : self.crop]
        protocol = get_protocol(str(item["protocol"]))
        if protocol.scale != self.student.scale:
            raise ValueError(f"protocol {protocol.name} is x{protocol.scale} but the model is x{self.student.scale}")
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
        rows = []
        for case in protocol.cases:
            hr, lr = protocol.make_pair(image, case, key)  # (1, 3, H, W), (1, 3, H/s, W/s)
            with torch.no_grad():
                sr = upscale_tiled(self.model, lr.to(self.device), self.tile, self.overlap).cpu()
            base = bicubic_upsample(lr, protocol.scale)
            s = protocol.scale
            rows.append(
                {
                    "set": str(item["set"]),
                    "image": str(item["image"]),
                    "protocol": protocol.name,
                    "case": case.name,
                    "psnr": float(psnr(sr, hr, s)[0]),
                    "ssim": float(ssim(sr, hr, s)[0]),
                    "bicubic_psnr": float(psnr(base, hr, s)[0]),
                    "bicubic_ssim": float(ssim(base, hr, s)[0]),
                }
            )
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [row for i in range(len(batch["set"])) for row in self.score({k: batch[k][i] for k in batch})]
        return {key: np.array([row[key] for row in rows]) for key in rows[0]}


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["set"], r["image"], r["protocol"], r["case"]))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def score_local(items: list[dict[str, Any]], scorer: Scorer) -> list[dict[str, Any]]:
    return _sorted([row for item in items for row in scorer.score(item)])


def score_with_ray(items: list[dict[str, Any]], checkpoint: bytes, cfg: Config) -> list[dict[str, Any]]:
    """The same scoring as Ray Data batch inference on an actor pool; GPU actors when the cluster has GPUs."""
    from workflows.runtime import init_ray

    ray = init_ray(cfg.ray)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0
    actors = max(1, min(cfg.evaluate.actors, gpus if use_gpu else cfg.evaluate.actors, len(items)))
    dataset = ray.data.from_items(items).map_batches(
        Scorer,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "tile": cfg.evaluate.tile,
            "overlap": cfg.evaluate.overlap,
            "crop": cfg.evaluate.crop,
            "device": "cuda" if use_gpu else "cpu",
            "precision": cfg.evaluate.precision,
        },
        batch_size=cfg.evaluate.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )
    return _sorted([{k: _plain(v) for k, v in row.items()} for row in dataset.take_all()])


# ----------------------------------------------------------------------------- tables


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _per_set(rows: list[dict[str, Any]], protocol: str, prefix: str) -> dict[str, dict[str, tuple[float, float]]]:
    """{set: {case: (mean PSNR, mean SSIM)}} over the set's images, plus a 'mean' case over cases."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    sets = sorted({r["set"] for r in rows if r["protocol"] == protocol}, key=_set_order)
    for set_name in sets:
        chosen = [r for r in rows if r["protocol"] == protocol and r["set"] == set_name]
        cases = list(dict.fromkeys(r["case"] for r in chosen))
        out[set_name] = {
            case: (
                _mean([r[f"{prefix}psnr"] for r in chosen if r["case"] == case]),
                _mean([r[f"{prefix}ssim"] for r in chosen if r["case"] == case]),
            )
            for case in cases
        }
        out[set_name]["mean"] = (
            _mean([v[0] for v in out[set_name].values()]),
            _mean([v[1] for v in out[set_name].values()]),
        )
    return out


def _set_order(name: str) -> tuple[int, str]:
    order = (*PAPER_SETS, "Manga109", SAMPLES_SET)
    return (order.index(name) if name in order else len(order), name)


def _published_rows(
    protocol: str, cases: list[str], sets: list[str]
) -> list[tuple[str, str, dict[str, dict[str, float]]]]:
    """(method, params, {set: {case: PSNR}}) for the published figures of the sets present."""
    rows = []
    for method, entry in PUBLISHED.get(protocol, {}).items():
        table: dict[str, dict[str, float]] = {}
        for set_name in sets:
            if "psnr" in entry and set_name in entry["psnr"]:
                table[set_name] = dict(zip(_ISO_CASES, entry["psnr"][set_name]))
                table[set_name]["mean"] = _mean(list(entry["psnr"][set_name]))
            elif "mean_psnr" in entry and set_name in entry["mean_psnr"]:
                table[set_name] = {"mean": entry["mean_psnr"][set_name]}
        if table:
            rows.append((method, entry["params"], table))
    return rows


def _cell(values: dict[str, float], cases: list[str], per_case: bool) -> str:
    if per_case and all(c in values for c in cases):
        return " / ".join(f"{values[c]:.2f}" for c in cases)
    return f"{values['mean']:.2f}" if "mean" in values else "-"


@dataclass
class Tables:
    markdown: str
    csv: str


def build_tables(rows: list[dict[str, Any]], protocols: list[str], params: int) -> Tables:
    """Paper-style tables: rows = method (and setting), columns = sets; always the bicubic row.

    Markdown: per protocol, cells 'case1 / case2 / case3' when there are at most three cases
    (the paper's setting-1 layout), else the mean over cases. CSV: one line per method and case
    (plus 'mean'), with '<set> PSNR' and '<set> SSIM' columns.
    """
    md: list[str] = []
    all_sets = sorted({r["set"] for r in rows}, key=_set_order)
    header = ["method", "params", "protocol", "setting", "case"] + [
        f"{s} {m}" for s in all_sets for m in ("PSNR", "SSIM")
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for name in protocols:
        protocol = get_protocol(name)
        ours, base = _per_set(rows, name, ""), _per_set(rows, name, "bicubic_")
        sets = list(ours)
        cases = [c.name for c in protocol.cases]
        per_case = len(cases) <= 3
        measured = [(BICUBIC, "-", base), (OURS, f"{params / 1e6:.2f}M", ours)]
        published = _published_rows(name, cases, sets)
        shown = ", ".join(cases) if per_case else f"mean over {len(cases)} cases"
        md += [
            f"### {name}: {protocol.description} (x{protocol.scale} Y-PSNR dB; {shown})",
            "",
            "| method | params | " + " | ".join(sets) + " |",
            "| --- | --- |" + " --- |" * len(sets),
        ]
        psnr_only = [(m, p, {s: {c: v[0] for c, v in t.items()} for s, t in table.items()}) for m, p, table in measured]
        for method, p, psnr_table in [psnr_only[0], *published, psnr_only[1]]:
            cells = [_cell(psnr_table.get(s, {}), cases, per_case) for s in sets]
            md.append(f"| {method} | {p} | " + " | ".join(cells) + " |")
        md.append("")
        for method, p, table in measured:
            for case in [*cases, "mean"]:
                line = [method, p, name, protocol.setting, case]
                for s in all_sets:
                    value = table.get(s, {}).get(case)
                    line += [f"{value[0]:.4f}", f"{value[1]:.4f}"] if value else ["", ""]
                writer.writerow(line)
        for method, p, tab in published:
            for case in [*cases, "mean"]:
                line = [method, p, name, protocol.setting, case]
                for s in all_sets:
                    figure = tab.get(s, {}).get(case)
                    line += [f"{figure:.2f}", ""] if figure is not None else ["", ""]
                if any(line[5:]):
                    writer.writerow(line)
    return Tables("\n".join(md), buffer.getvalue())


# ----------------------------------------------------------------------------- IDR discriminability


def _patches(images: dict[str, bytes], count: int, size: int, seed: int) -> torch.Tensor:
    """`count` random HR crops (size x size) of `{name: file bytes}`, fixed by `seed` -> (count, 3, size, size)."""
    rng = np.random.default_rng(seed)
    names = list(images)
    pixels = [_decoded(images[name], name) for name in names]
    crops = []
    for i in range(count):
        image = pixels[i % len(pixels)]
        height, width, _ = image.shape
        if min(height, width) < size:
            raise UsageError(
                f"evaluate.idr_patch: {names[i % len(names)]} is {width}x{height}, smaller than the IDR patch {size}"
            )
        y, x = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
        crops.append(image[y : y + size, x : x + size])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)


def idr_features(
    model: Teacher | Student,
    hr: torch.Tensor,
    scale: int,
    basis: torch.Tensor,
    setting: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled IDRs (N * len(IDR_SIGMAS), 128) of HR patches degraded with each grid sigma, and labels."""
    features, labels = [], []
    for label, sigma in enumerate(IDR_SIGMAS):
        case = DegradationCase(name=f"sigma{sigma}", sigma=sigma)
        generator = torch.Generator().manual_seed(seed + label)
        lr = degrade(hr, case.kernel().unsqueeze(0), scale, None, generator)  # (N, 3, h, w)
        with torch.no_grad():
            if isinstance(model, Teacher):
                prior = case.prior(basis, with_noise=setting == 2).expand(lr.shape[0], -1)
                idr = model.encode(lr, prior)
            else:
                idr = model.encode(lr)
        features.append(idr.mean(dim=(2, 3)).numpy())  # (N, 128, h/4, w/4) -> (N, 128)
        labels.append(np.full(lr.shape[0], label))
    return np.concatenate(features), np.concatenate(labels)


def probe_scores(features: np.ndarray, labels: np.ndarray, train: np.ndarray) -> dict[str, float]:
    """Linear-probe accuracy on the held-out rows (~train) and the silhouette of the degradation clusters."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    probe.fit(features[train], labels[train])
    accuracy = float((probe.predict(features[~train]) == labels[~train]).mean())
    # on the raw features: per-dimension standardising would inflate dimensions that carry only noise
    return {
        "probe_accuracy": accuracy,
        "silhouette": float(silhouette_score(features, labels)),
        "chance": 1.0 / len(np.unique(labels)),
    }


def _projection_png(embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    fig, axes = plt.subplots(1, len(embeddings), figsize=(5 * len(embeddings), 4.5), squeeze=False)
    for ax, (name, (features, labels)) in zip(axes[0], embeddings.items()):
        points = PCA(n_components=2).fit_transform((features - features.mean(0)) / (features.std(0) + 1e-8))
        scatter = ax.scatter(points[:, 0], points[:, 1], c=[IDR_SIGMAS[i] for i in labels], cmap="viridis", s=12)
        ax.set_title(f"{name} IDR (pooled), PCA")
        fig.colorbar(scatter, ax=ax, label="blur sigma")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def idr_discriminability(
    models: dict[str, Any], images: dict[str, bytes], cfg: Config
) -> tuple[dict[str, dict[str, float]], bytes]:
    """Probe scores per model ({'student': Loaded, 'teacher': Loaded}) and the projection plot (PNG bytes).

    `images` ({name: file bytes}) give the HR patches. Patches are split by content: the probe
    trains on the first half of the patches (all degradations) and is scored on the other half,
    so it cannot recognise the picture.
    """
    hr = _patches(images, cfg.evaluate.idr_patches, cfg.evaluate.idr_patch, cfg.train.seed)
    scores, embeddings = {}, {}
    for name, loaded in models.items():
        basis = loaded.pca_basis if loaded.pca_basis is not None else kernel_pca_basis(cfg.model.pca_seed)
        features, labels = idr_features(loaded.model, hr, loaded.scale, basis, loaded.setting)
        train = np.tile(np.arange(len(hr)) < len(hr) // 2, len(IDR_SIGMAS))
        scores[name] = probe_scores(features, labels, train)
        embeddings[name] = (features, labels)
    return scores, _projection_png(embeddings)


# ----------------------------------------------------------------------------- orchestration


@dataclass
class Evaluation:
    rows: list[dict[str, Any]]
    tables: Tables
    idr: dict[str, dict[str, float]] = field(default_factory=dict)
    idr_plot: bytes | None = None
    run_id: str | None = None


def _per_image_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _outputs(result: Evaluation) -> dict[str, bytes]:
    files = {
        "table.md": result.tables.markdown.encode(),
        "table.csv": result.tables.csv.encode(),
        "per_image.csv": _per_image_csv(result.rows).encode(),
    }
    if result.idr:
        files["idr.json"] = json.dumps(result.idr, indent=2).encode()
    if result.idr_plot:
        files["idr_projection.png"] = result.idr_plot
    return files


def _metric_name(*parts: str) -> str:
    return "/".join(p.replace(" ", "_").replace("(", "").replace(")", "") for p in parts)


def _table_metrics(result: Evaluation) -> dict[str, float]:
    """Our and bicubic's PSNR/SSIM per protocol, set and case, and the IDR scores, as MLflow metrics."""
    metrics = {}
    for line in csv.DictReader(io.StringIO(result.tables.csv)):
        if line["method"] not in (OURS, BICUBIC):
            continue
        for column, value in line.items():
            if column.endswith((" PSNR", " SSIM")) and value:
                set_name, metric = column.rsplit(" ", 1)
                method = "bicubic" if line["method"] == BICUBIC else "ours"
                metrics[_metric_name(method, metric.lower(), line["protocol"], set_name, line["case"])] = float(value)
    for model, values in result.idr.items():
        metrics.update({_metric_name("idr", model, k): v for k, v in values.items()})
    return metrics


def log_to_mlflow(result: Evaluation, cfg: Config, model_ref: str, files: dict[str, bytes]) -> str:
    """A new run `evaluate` with the parameters, table metrics and files; ended FAILED if logging fails."""
    from mlflow.entities import Metric

    from workflows import tracking

    mlflow_client = tracking.client(cfg)
    run_id = mlflow_client.create_run(tracking.experiment_id(cfg), run_name="evaluate").info.run_id
    status = "FAILED"
    try:
        params = {"model": redact(model_ref), "protocols": ",".join(cfg.evaluate.protocols)}
        params["sets"] = ",".join(sorted({r["set"] for r in result.rows}))
        params |= {key: str(getattr(cfg.evaluate, key)) for key in ("tile", "overlap", "crop")}
        tracking.log_params(cfg, run_id, params)
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, 0) for key, value in _table_metrics(result).items()]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            mlflow_client.log_batch(run_id, metrics=metrics[start : start + 1000])
        with tempfile.TemporaryDirectory() as folder:
            for name, data in files.items():
                Path(folder, name).write_bytes(data)
                mlflow_client.log_artifact(run_id, str(Path(folder, name)), artifact_path="evaluation")
        status = "FINISHED"
    finally:
        tracking.end_run(cfg, run_id, status)
    return run_id


def idr_images(sets: dict[str, dict[str, bytes]]) -> dict[str, bytes]:
    """The IDR probe's pictures: the evaluation images when they are scored, else every benchmark image."""
    if SAMPLES_SET in sets:
        return sets[SAMPLES_SET]
    return {f"{set_name}/{image}": data for set_name, images in sets.items() for image, data in images.items()}


def _load_models(model_ref: str, teacher_ref: str | None, cfg: Config) -> tuple[bytes, Scorer, Any]:
    """(the student checkpoint's bytes, a CPU scorer on it, the teacher or None); refusals are usage errors."""
    try:
        with tempfile.TemporaryDirectory(prefix="lightbsr-evaluate-") as workdir:
            checkpoint_file = fetch_checkpoint(model_ref, cfg, workdir)
            if checkpoint_file.is_dir():
                checkpoint_file = checkpoint_file / "model.pt"
            checkpoint = checkpoint_file.read_bytes()
            scorer = Scorer(
                checkpoint, cfg.evaluate.tile, cfg.evaluate.overlap, cfg.evaluate.crop, "cpu", cfg.evaluate.precision
            )
            if scorer.loaded.role != "student":
                raise CheckpointError(f"{model_ref} holds a {scorer.loaded.role}; the tables score a student")
            teacher = None
            if teacher_ref:
                teacher = load_checkpoint(fetch_checkpoint(teacher_ref, cfg, workdir), role="teacher")
    except (CheckpointError, RegistryError) as error:
        raise UsageError(str(error)) from error
    return checkpoint, scorer, teacher


def evaluate_model(
    model_ref: str,
    cfg: Config,
    *,
    benchmarks: str | None = None,
    local: bool = False,
    teacher_ref: str | None = None,
    idr: bool = True,
    out: str | None = None,
    log: bool = True,
) -> Evaluation:
    """Score `model_ref` on every benchmark set present plus the evaluation images; tables, IDR probe, MLflow.

    Every input (images, benchmarks, checkpoints) is read through `workflows.storage`, so a
    folder and an `s3://` URL behave the same.
    """
    checkpoint, scorer, teacher = _load_models(model_ref, teacher_ref, cfg)
    sets = read_sets(cfg, benchmarks)
    items = collect_items(sets, list(cfg.evaluate.protocols))
    rows = score_local(items, scorer) if local else score_with_ray(items, checkpoint, cfg)
    params = count_parameters(scorer.student)
    result = Evaluation(rows, build_tables(rows, list(cfg.evaluate.protocols), params))
    if idr:
        models = {"student": scorer.loaded, **({"teacher": teacher} if teacher else {})}
        result.idr, result.idr_plot = idr_discriminability(models, idr_images(sets), cfg)
    files = _outputs(result)
    if out:
        for name, data in files.items():
            storage.atomic_write_bytes(storage.join(out, name), data, cfg.storage.s3)
    if log:
        result.run_id = log_to_mlflow(result, cfg, model_ref, files)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightbsr evaluate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="checkpoint path (ours or the authors'), s3:// URL or models:/name@alias"
    )
    parser.add_argument(
        "--benchmarks",
        help="folder or s3:// URL holding <set>/HR/*.png for any set names (default: data.benchmarks); "
        f"published rows for {', '.join(PAPER_SETS)}",
    )
    parser.add_argument("--teacher", help="teacher checkpoint, to compare its IDR with the student's")
    parser.add_argument("--out", help="folder or URL for the tables (default: <storage.root>/evaluation)")
    parser.add_argument("--local", action="store_true", help="score in this process instead of Ray Data")
    parser.add_argument("--no-idr", action="store_true", help="skip the IDR discriminability probe")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--precision", choices=PRECISIONS, help="fp32, bf16 or fp16 (default: evaluate.precision)")
    add_config_arguments(parser)
    return parser


def _unread_keys(cfg: Config) -> set[str]:
    """Config keys evaluate does not read, so preflight leaves them alone (e.g. the default
    `data/samples/eval` outside the repository when benchmarks are given)."""
    unread = {"data.train_images", "data.shards", "train.teacher_checkpoint"}
    if cfg.data.benchmarks or not cfg.evaluate.samples:
        unread.add("data.eval_images")  # optional then: a missing folder is a logged skip in `sample_images`
    return unread


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = [*args.overrides, *([f"data.benchmarks={args.benchmarks}"] if args.benchmarks else [])]
    overrides += [f"evaluate.precision={args.precision}"] if args.precision else []
    cfg = load_config(args.config, overrides)
    preflight.check(cfg, skip=_unread_keys(cfg))
    result = evaluate_model(
        args.model,
        cfg,
        local=args.local,
        teacher_ref=args.teacher,
        idr=not args.no_idr,
        out=args.out or cfg.url("evaluation"),
        log=not args.no_mlflow,
    )
    print(result.tables.markdown)
    for model, values in result.idr.items():
        print(f"IDR {model}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="lightbsr evaluate"))
