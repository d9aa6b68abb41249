"""Load and export checkpoints in the authors' key format (MJ-NCEPU/LightBSR ``BlindSR.state_dict()``).

Their layout (read from their ``model/student.py``, ``model/teacher.py``, ``moco/builder.py``):
``G.*`` the generator (groups and blocks are positions in ``nn.Sequential``s), ``E.E.*`` the
student encoder (conv, BN, LeakyReLU triples), and for the teacher ``E.encoder_q.*`` /
``E.encoder_k.*`` (encoder ``E`` plus ``mlp``), ``E.queue``, ``E.queue_ptr``.

The translation is one table of (our key pattern, their key template); loading inverts it,
so a key only one side knows is reported by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from os import PathLike

import torch
from torch import nn

from lightbsr.models import ModelSpec, Role, build_model
from lightbsr.student import Student
from lightbsr.teacher import Teacher


class ReferenceCheckpointError(ValueError):
    """The checkpoint does not fit the requested model; the message names the offending keys."""


def generator_rules(n_groups: int, n_blocks: int) -> list[tuple[str, str]]:
    """(our key regex, their key template) for one generator, keys relative to G."""
    # fmt: off
    return [
        (r"(sub_mean|add_mean)\.(\w+)", r"\1.\2"),
        (r"head\.(\w+)", r"head.0.\1"),
        (r"converter\.channel_code\.(\w+)", r"compress.0.\1"),
        (r"converter\.spatial_code\.(\w+)", r"afterpixshuffle.0.\1"),
        (r"groups\.(\d+)\.refine\.channel\.(\d+)\.(\w+)", r"body.\1.ca_change.avgafter.\2.\3"),
        (r"groups\.(\d+)\.refine\.spatial\.(\d+)\.(\w+)", r"body.\1.xk_change.sig1.\2.\3"),
        (r"groups\.(\d+)\.blocks\.(\d+)\.spatial\.reduce\.(\w+)", r"body.\1.body.\2.spatial_mixing.spatial_attention.0.\3"),
        (r"groups\.(\d+)\.blocks\.(\d+)\.spatial\.attend\.(\w+)", r"body.\1.body.\2.spatial_mixing.spatial_attention.2.\3"),
        (r"groups\.(\d+)\.blocks\.(\d+)\.spatial\.partial_conv\.(\w+)", r"body.\1.body.\2.spatial_mixing.partial_conv3.\3"),
        (r"groups\.(\d+)\.blocks\.(\d+)\.channel\.mlp\.(\d+)\.(\w+)", r"body.\1.body.\2.spatial_mixing.loc.avgafter.\3.\4"),
        (r"groups\.(\d+)\.blocks\.(\d+)\.ffn\.(\w+)", r"body.\1.body.\2.\3"),
        (r"groups\.(\d+)\.blocks\.(\d+)\.ffn\.(\w+)\.(\w+)", r"body.\1.body.\2.\3.\4"),
        (r"groups\.(\d+)\.convnext\.ffn\.(\w+)", rf"body.\1.body.{n_blocks}.\2"),
        (r"groups\.(\d+)\.convnext\.ffn\.(\w+)\.(\w+)", rf"body.\1.body.{n_blocks}.\2.\3"),
        (r"groups\.(\d+)\.fuse\.(\w+)", rf"body.\1.body.{n_blocks + 1}.\2"),
        (r"body_conv\.(\w+)", rf"body.{n_groups}.\1"),
        (r"upsample\.(\d+)\.(\w+)", r"tail.0.\1.\2"),
        (r"to_rgb\.(\w+)", r"tail.1.\1"),
    ]
    # fmt: on


def encoder_rules() -> list[tuple[str, str]]:
    """Our ConvBNLeaky stage i is their Sequential positions 3i (conv) and 3i + 1 (BN)."""
    return [(r"stages\.(\d+)\.conv\.(\w+)", "E.<3*\\1>.\\2"), (r"stages\.(\d+)\.norm\.(\w+)", "E.<3*\\1+1>.\\2")]


def head_rules() -> list[tuple[str, str]]:
    return [(r"mlp\.(\d+)\.(\w+)", r"mlp.\1.\2")]


def prefixed(rules: list[tuple[str, str]], ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(re.escape(ours) + pattern, theirs + template) for pattern, template in rules]


def model_rules(model: Student | Teacher) -> list[tuple[str, str]]:
    """The whole translation table for a student or a teacher."""
    generator = model.generator
    rules = prefixed(generator_rules(generator.n_groups, generator.n_blocks), "generator.", "G.")
    if isinstance(model, Teacher):
        rules += prefixed(encoder_rules(), "encoder.", "E.encoder_q.")
        rules += prefixed(head_rules(), "head.", "E.encoder_q.")
        rules += prefixed(encoder_rules(), "key_encoder.", "E.encoder_k.")
        rules += prefixed(head_rules(), "key_head.", "E.encoder_k.")
        rules += [(r"queue", "E.queue"), (r"queue_ptr", "E.queue_ptr")]
    else:
        rules += prefixed(encoder_rules(), "encoder.", "E.")
    return rules


def their_key(our_key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, template in rules:
        match = re.fullmatch(pattern, our_key)
        if match:
            key = match.expand(template)
            return re.sub(r"<(\d+)\*(\d+)(?:\+(\d+))?>", lambda m: str(int(m[1]) * int(m[2]) + int(m[3] or 0)), key)
    raise ReferenceCheckpointError(f"no reference key known for our key {our_key!r}")


def key_map(model: Student | Teacher) -> dict[str, str]:
    """our state_dict key -> the authors' key, for every tensor of the model."""
    rules = model_rules(model)
    return {ours: their_key(ours, rules) for ours in model.state_dict()}


def read_state_dict(state_dict_or_path: Mapping[str, torch.Tensor] | str | PathLike) -> Mapping[str, torch.Tensor]:
    if isinstance(state_dict_or_path, Mapping):
        return state_dict_or_path
    state = torch.load(state_dict_or_path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ReferenceCheckpointError(f"{state_dict_or_path}: expected a state_dict, got {type(state).__name__}")
    return state


def check_keys(given: set[str], expected: set[str], role: Role) -> None:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ReferenceCheckpointError(
            f"reference {role} checkpoint does not match: {len(missing)} missing keys {listed(missing)}, "
            f"{len(unexpected)} unexpected keys {listed(unexpected)}"
        )


def listed(keys: list[str], limit: int = 8) -> str:
    return str(keys[:limit])[:-1] + (", ...]" if len(keys) > limit else "]")


def load_reference_checkpoint(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | PathLike,
    *,
    role: Role = "student",
    scale: int,
    setting: int = ModelSpec.setting,
    n_groups: int = ModelSpec.n_groups,
    n_blocks: int = ModelSpec.n_blocks,
) -> Student | Teacher:
    """Our Student/Teacher loaded, strictly, from the authors' ``BlindSR.state_dict()``."""
    state = read_state_dict(state_dict_or_path)
    model = build_model(role, ModelSpec(scale=scale, setting=setting, n_groups=n_groups, n_blocks=n_blocks))
    mapping = key_map(model)
    check_keys(set(state), set(mapping.values()), role)
    expected_shapes = {k: v.shape for k, v in model.state_dict().items()}
    for our_key, ref_key in mapping.items():
        if state[ref_key].shape != expected_shapes[our_key]:
            raise ReferenceCheckpointError(
                f"{ref_key}: expected shape {tuple(expected_shapes[our_key])} for a x{scale} {role}"
                f"{f' (setting {setting})' if role == 'teacher' else ''}, got {tuple(state[ref_key].shape)}"
            )
    model.load_state_dict({our_key: state[ref_key] for our_key, ref_key in mapping.items()}, strict=True)
    return model


def export_reference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our Student/Teacher -> a state_dict the authors' ``BlindSR`` loads with strict=True."""
    if not isinstance(model, (Student, Teacher)):
        raise ValueError(f"model: expected a lightbsr Student or Teacher, got {type(model).__name__}")
    mapping = key_map(model)
    return {mapping[k]: v.detach().clone() for k, v in model.state_dict().items()}
