"""A medfuse model file: the weights and everything needed to use them (no Flower).

One format for every model medfuse writes (the federation's `final/model.pt`, a public
pretrained model), so any of them can start a federation or be loaded by a tool. A file
that is not a medfuse model, or whose model config or label set is not the one asked
for, is refused with both named, never loaded half-way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared_model.config import ModelConfig

FORMAT = 1  # bump when the payload's keys change


class ModelFileError(ValueError):
    """The file cannot be used as asked; the message says why (for a person)."""


@dataclass(frozen=True)
class ModelFile:
    path: Path
    state: dict[str, torch.Tensor]
    model_config: ModelConfig
    labels: tuple[str, ...]
    meta: dict[str, Any]  # everything else in the payload (round, corpus digest, metrics)


def payload(state: Mapping[str, torch.Tensor], model_config: Mapping[str, Any] | ModelConfig,
            labels: Sequence[str], **meta: Any) -> dict[str, Any]:
    """What `torch.save` writes: weights, config, labels, and any self-description."""
    cfg = model_config.model_dump() if isinstance(model_config, ModelConfig) else model_config
    return {"format": FORMAT, "model": {k: v.detach().cpu() for k, v in state.items()},
            "model_config": dict(cfg), "labels": list(labels), **meta}


def load_model_file(path: Path) -> ModelFile:
    """Read and check a medfuse model file (weights only: nothing is executed)."""
    path = Path(path).expanduser()
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except Exception as exc:  # unpickling and zip errors alike: not a model file
        raise ModelFileError(f"{path} is not a medfuse model file ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or "model" not in raw:
        raise ModelFileError(f"{path} is not a medfuse model file (format {FORMAT} expected)")
    try:
        cfg = ModelConfig(**raw["model_config"])
    except Exception as exc:
        raise ModelFileError(f"{path}: its model config is not valid here ({exc})") from None
    meta = {k: v for k, v in raw.items() if k not in ("model", "model_config", "labels")}
    return ModelFile(path, dict(raw["model"]), cfg, tuple(raw.get("labels", ())), meta)


def check_matches(model: ModelFile, model_config: ModelConfig, labels: Sequence[str]) -> None:
    """`ModelFileError` naming both sides unless `model` is this config and label set."""
    problems = []
    if tuple(labels) != model.labels:
        problems.append(f"labels: the file has {','.join(model.labels)!r}, the run "
                        f"{','.join(labels)!r}")
    if model.model_config != model_config:
        mine, theirs = model_config.model_dump(), model.model_config.model_dump()
        diff = [f"{k}={theirs[k]!r} (run: {mine[k]!r})" for k in mine if mine[k] != theirs[k]]
        problems.append("model config: the file has " + ", ".join(diff))
    if problems:
        raise ModelFileError(f"{model.path} does not fit this run: " + "; ".join(problems))
