"""Checkpoint files <-> models: the one place that turns a file into a teacher or a student.

Our format ("lightbsr/1") is one `torch.save` dict, stored either as the file itself or as
`<dir>/model.pt`:

    {"format": "lightbsr/1", "role": "teacher" | "student",
     "model_config": {scale, setting, n_groups, n_blocks, queue_size, momentum, pca_seed},
     "model": state_dict, "pca_basis": (441, 15) float32 or None,
     "epoch": int, "iteration": int, "train_state": dict | None, "config": dict | None}

The authors' checkpoints (`BlindSR.state_dict()`, keys `G.*` plus `E.E.*` for a student or
`E.encoder_q.*` for a teacher) load too; role, scale, setting and depth are read from the keys
and shapes when not given.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightbsr.files import atomic_write
from lightbsr.models import ROLES, ModelSpec, build_model, spec_keys
from lightbsr.teacher import PRIOR_CHANNELS

__all__ = [
    "FORMAT",
    "CheckpointError",
    "Loaded",
    "checkpoint_file",
    "describe_reference_state_dict",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = "lightbsr/1"
MODEL_FILE = "model.pt"
MODEL_CONFIG_KEYS = spec_keys()


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not describe a lightbsr model; names the file."""


@dataclass
class Loaded:
    """A model ready for inference (eval mode) and what came with it."""

    model: nn.Module
    role: str
    scale: int
    setting: int
    pca_basis: torch.Tensor | None
    model_config: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @property
    def is_reference(self) -> bool:
        """True when the file was an authors' checkpoint rather than ours."""
        return self.raw.get("format") != FORMAT


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The file that holds the checkpoint: the path itself, or `<dir>/model.pt`."""
    path = Path(path)
    if path.is_dir():
        inner = path / MODEL_FILE
        if not inner.is_file():
            raise CheckpointError(f"checkpoint folder {path} has no {MODEL_FILE}")
        return inner
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside a DDP / compile wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _complete_model_config(model_config: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(model_config) - set(MODEL_CONFIG_KEYS))
    if unknown:
        raise CheckpointError(f"{where}: unknown model_config keys {unknown} (expected {list(MODEL_CONFIG_KEYS)})")
    if "scale" not in model_config:
        raise CheckpointError(f"{where}: model_config has no 'scale'")
    out = {**ModelSpec().as_dict(), **dict(model_config)}
    if out["scale"] not in (2, 3, 4):
        raise CheckpointError(f"{where}: model_config scale {out['scale']!r} is not 2, 3 or 4")
    if out["setting"] not in (1, 2):
        raise CheckpointError(f"{where}: model_config setting {out['setting']!r} is not 1 or 2")
    return {key: out[key] for key in MODEL_CONFIG_KEYS}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    role: str,
    model_config: Mapping[str, Any],
    pca_basis: torch.Tensor | Any | None,
    epoch: int = 0,
    iteration: int = 0,
    train_state: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write our format atomically; a path ending in .pt/.pth is the file, anything else a folder.

    Returns the file written.
    """
    if role not in ROLES:
        raise CheckpointError(f"{path}: role {role!r} is not one of {ROLES}")
    model_config = _complete_model_config(model_config, str(path))
    if pca_basis is not None:
        pca_basis = torch.as_tensor(pca_basis, dtype=torch.float32).detach().cpu()
    payload = {
        "format": FORMAT,
        "role": role,
        "model_config": model_config,
        "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        "pca_basis": pca_basis,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "train_state": train_state,
        "config": config,
    }
    path = Path(path)
    target = path if path.suffix in {".pt", ".pth"} else path / MODEL_FILE
    return atomic_write(target, lambda handle: torch.save(payload, handle))


def _read(file: Path, map_location: Any) -> Any:
    with open(file, "rb") as handle:
        magic = handle.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip (or, legacy, a pickle)
        raise CheckpointError(f"{file} is not a readable torch checkpoint (it is not a torch.save file)")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"checkpoint {file} holds objects other than tensors and plain data: {error}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{file} is not a readable torch checkpoint: {error}") from None


def _is_reference_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and any(str(k).startswith("G.") for k in obj)
        and any(str(k).startswith("E.") for k in obj)
    )


def describe_reference_state_dict(state_dict: Mapping[str, torch.Tensor], where: str = "state dict") -> dict[str, Any]:
    """Role, scale, setting and depth of an authors' `BlindSR.state_dict()`, read from keys and shapes."""
    if any(k.startswith("E.encoder_q.") for k in state_dict):
        role, first_conv = "teacher", "E.encoder_q.E.0.weight"
    elif any(k.startswith("E.E.") for k in state_dict):
        role, first_conv = "student", "E.E.0.weight"
    else:
        raise CheckpointError(f"{where}: has G.* keys but neither E.E.* (student) nor E.encoder_q.* (teacher)")
    try:
        tail = state_dict["G.tail.0.0.weight"]  # (out, 64, 3, 3): 576 at x3, 256 at x2/x4
        in_channels = state_dict[first_conv].shape[1]
    except KeyError as error:
        raise CheckpointError(f"{where}: missing key {error.args[0]} of the authors' model") from None
    if tail.shape[0] == 576:
        scale = 3
    else:
        scale = 4 if "G.tail.0.2.weight" in state_dict else 2
    settings = {3: 1} | {3 + width: setting for setting, width in PRIOR_CHANNELS.items()}  # the student's: 3
    if in_channels not in settings:
        raise CheckpointError(f"{where}: encoder input has {in_channels} channels (expected one of {sorted(settings)})")
    groups = {int(k.split(".")[2]) for k in state_dict if k.startswith("G.body.") and ".ca_change." in k}
    blocks = {int(k.split(".")[4]) for k in state_dict if k.startswith("G.body.0.body.") and k.endswith(".gamma")}
    if not groups or not blocks:
        raise CheckpointError(f"{where}: cannot find the generator's groups/blocks (G.body.*)")
    return {
        "role": role,
        "scale": scale,
        "setting": settings[in_channels],
        # Blocks carry a layer-scale 'gamma'; each group also ends with one plain ConvNeXt block.
        "n_groups": max(groups) + 1,
        "n_blocks": max(blocks),
    }


def _load_reference(
    state_dict: Mapping[str, torch.Tensor], file: Path, role: str | None, scale: int | None, setting: int | None
) -> Loaded:
    from lightbsr.reference import load_reference_checkpoint

    found = describe_reference_state_dict(state_dict, str(file))
    for name, given in (("role", role), ("scale", scale), ("setting", setting)):
        if given is not None and given != found[name]:
            raise CheckpointError(f"{file}: asked for {name} {given!r} but the checkpoint holds {name} {found[name]!r}")
    try:
        model = load_reference_checkpoint(
            dict(state_dict),
            role=found["role"],
            scale=found["scale"],
            setting=found["setting"],
            n_groups=found["n_groups"],
            n_blocks=found["n_blocks"],
        )
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{file}: not a loadable authors' checkpoint: {error}") from None
    model_config = _complete_model_config(
        {k: found[k] for k in ("scale", "setting", "n_groups", "n_blocks")}, str(file)
    )
    return Loaded(
        model.eval(),
        found["role"],
        found["scale"],
        found["setting"],
        None,
        model_config,
        {"format": "reference", "model": state_dict},
    )


def _load_ours(raw: dict[str, Any], file: Path) -> Loaded:
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {raw.get('format')!r} is not {FORMAT!r}")
    role = raw.get("role")
    if role not in ROLES:
        raise CheckpointError(f"{file}: role {role!r} is not one of {ROLES}")
    if not isinstance(raw.get("model_config"), Mapping) or not isinstance(raw.get("model"), Mapping):
        raise CheckpointError(f"{file}: missing 'model_config' or 'model' (state dict)")
    model_config = _complete_model_config(raw["model_config"], str(file))
    model = build_model(role, model_config)
    try:
        model.load_state_dict(raw["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{file}: weights do not fit a {role} with {model_config}: {error}") from None
    basis = raw.get("pca_basis")
    return Loaded(model.eval(), role, model_config["scale"], model_config["setting"], basis, model_config, raw)


def load_checkpoint(
    path_or_dir: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    role: str | None = None,
    scale: int | None = None,
    setting: int | None = None,
) -> Loaded:
    """Load ours or the authors' checkpoint from a local file or folder; the model is in eval mode.

    `role`/`scale`/`setting` are checks (and, for the authors' files, they must match what the
    keys say). Anything else raises CheckpointError naming the file.
    """
    file = checkpoint_file(path_or_dir)
    raw = _read(file, map_location)
    if isinstance(raw, Mapping) and "format" in raw:
        loaded = _load_ours(dict(raw), file)
    else:
        state_dict = raw
        if isinstance(raw, Mapping) and not _is_reference_state_dict(raw):
            state_dict = next((raw[k] for k in ("state_dict", "model") if _is_reference_state_dict(raw.get(k))), raw)
        if not _is_reference_state_dict(state_dict):
            raise CheckpointError(
                f"{file} is neither a {FORMAT} checkpoint nor an authors' BlindSR state dict (G.*/E.* keys)"
            )
        return _load_reference(state_dict, file, role, scale, setting)
    for name, given, found in (
        ("role", role, loaded.role),
        ("scale", scale, loaded.scale),
        ("setting", setting, loaded.setting),
    ):
        if given is not None and given != found:
            raise CheckpointError(f"{file}: asked for {name} {given!r} but the checkpoint holds {name} {found!r}")
    return loaded
