"""A medfuse model file: the weights and everything needed to use them (no Flower).

One format for every model medfuse writes (the federation's `final/model.pt`, a public
pretrained model), so any of them can start a federation or be loaded by a tool. A file
that is not a medfuse model, or whose model config or label set is not the one asked
for, is refused with both named, never loaded half-way.

A model file can come from anyone (a coordinator, a public download), so it is data, not
code, and every part of it is checked before it is used, in this order:

1. the file: at most `MAX_FILE_BYTES`, a PyTorch zip archive that unpacks to at most as
   much (no zip bomb), read with `weights_only=True` (nothing is executed);
2. what it is: a training checkpoint is named as one, with where the model file is;
3. its model config: every field within the bounds of `ModelConfig`;
4. its labels: 2 to `MAX_CLASSES` distinct names of 1 to `MAX_LABEL_CHARS` printable
   characters (no control or formatting characters, no comma, no edge spaces), one per
   class;
5. the size its config asks for: the parameter count and one case's activations,
   estimated from the config alone, before any module is built;
6. its weights: every name, shape and dtype the config implies (taken from the model
   built on the "meta" device, which allocates nothing), before any weight is loaded.

Each refusal is one line that names the file and the field.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from shared_model.config import (
    DEFAULT_LESION_THRESHOLD,
    LABEL_RULE,
    MAX_CLASSES,
    ModelConfig,
    label_problem,
)

FORMAT = 2  # bump when the payload's keys change (2: model.ARCHITECTURE 2's layers)

MAX_FILE_BYTES = 1 << 30  # 1 GiB on disk and unpacked: ~2x MAX_PARAMETERS of float32
MAX_ZIP_ENTRIES = 4096  # torch writes one entry per tensor storage plus a few
MAX_PARAMETERS = 100_000_000  # 400 MB of float32; `ModelConfig.large()` is 5.3 M
# float32 values one case holds in training (2 GiB): `large()` at the largest image size a
# run config allows (1024 px) is estimated at 1.3 GiB
MAX_ACTIVATIONS = 512 * 1024 * 1024
_QUOTED = 60  # at most this many characters of a value are shown in a message
# where server/checkpoint.py writes the training checkpoints of a run (OUTPUT/checkpoints)
_CHECKPOINT_FOLDER = "checkpoints"


class ModelFileError(ValueError):
    """The file cannot be used as asked; the message says why (for a person)."""


LESION_THRESHOLD = "lesion_threshold"  # payload key of the calibrated threshold


@dataclass(frozen=True)
class ModelFile:
    path: Path
    state: dict[str, torch.Tensor]
    model_config: ModelConfig
    labels: tuple[str, ...]
    meta: dict[str, Any]  # everything else in the payload (round, corpus digest, metrics)

    @property
    def lesion_threshold(self) -> float:
        """The lesion score above which a box is drawn: calibrated on a validation split
        where the file was written with one (`lesion_threshold` in the payload, written by
        `medfuse calibrate`), else `DEFAULT_LESION_THRESHOLD`."""
        value = self.meta.get(LESION_THRESHOLD, DEFAULT_LESION_THRESHOLD)
        return float(value)


def payload(state: Mapping[str, torch.Tensor], model_config: Mapping[str, Any] | ModelConfig,
            labels: Sequence[str], **meta: Any) -> dict[str, Any]:
    """What `torch.save` writes: weights, config, labels, and any self-description."""
    cfg = model_config.model_dump() if isinstance(model_config, ModelConfig) else model_config
    return {"format": FORMAT, "model": {k: v.detach().cpu() for k, v in state.items()},
            "model_config": dict(cfg), "labels": list(labels), **meta}


def load_model_file(path: Path) -> ModelFile:
    """Read and check a medfuse model file (weights only: nothing is executed; see the
    module doc for every check). `ModelFileError` with one line where it is refused."""
    path = Path(path).expanduser()
    raw = _read(path)
    _refuse_checkpoint(path, raw)
    if "model" not in raw or "model_config" not in raw:
        raise ModelFileError(f"{path} is not a medfuse model file (no weights or no "
                             "model_config in it)")
    if raw.get("format") != FORMAT:
        raise ModelFileError(f"{path}: model file format {_quote(raw.get('format'))}; this "
                             f"medfuse reads format {FORMAT}")
    cfg = _model_config(path, raw["model_config"])
    labels = _labels(path, raw.get("labels"), cfg)
    check_size(cfg, where=f"{path}: its model_config")
    state = _weights(path, raw["model"], cfg)
    meta = {k: v for k, v in raw.items() if k not in ("model", "model_config", "labels")}
    return ModelFile(path, state, cfg, labels, meta)


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


# ------------------------------------------------------------------ the model's size


@dataclass(frozen=True)
class SizeEstimate:
    """What a config asks for, per part: (parameters, float32 activations of one case in
    training), and the config fields that set each part's size."""

    parts: dict[str, tuple[int, int]]

    @property
    def parameters(self) -> int:
        return sum(p for p, _ in self.parts.values())

    @property
    def activations(self) -> int:
        return sum(a for _, a in self.parts.values())

    def largest(self, which: int) -> str:
        """The part holding most parameters (which=0) or activations (which=1)."""
        return max(self.parts, key=lambda k: self.parts[k][which])


# the fields that size each part (named in a refusal)
PART_FIELDS: dict[str, str] = {
    "image encoder": "image_size, in_channels, cnn_widths, cnn_blocks_per_stage",
    "report encoder": "vocab_size, embed_dim, lstm_hidden, max_report_tokens",
    "fusion": "fusion, fused_dim, bilinear_rank",
    "heads": "fused_dim, num_classes",
    "report decoder": "vocab_size, embed_dim, fused_dim, decoder_hidden, max_gen_tokens",
}


def estimate_size(cfg: ModelConfig) -> SizeEstimate:
    """Parameters and one case's activations of `MedFuseModel(cfg)`, from the config alone
    (arithmetic on its fields: nothing is built). Mirrors shared_model/model.py; a test
    compares it with the built model's parameter count."""
    has_image, has_text = cfg.modality != "text", cfg.modality != "image"
    f, k, v, e = cfg.fused_dim, cfg.num_classes, cfg.vocab_size, cfg.embed_dim
    parts: dict[str, tuple[int, int]] = {}
    c = d_image = side = 0
    if has_image:
        w0, side = cfg.cnn_widths[0], cfg.image_size
        params = cfg.in_channels * w0 * 9 + 2 * w0  # stem conv + norm
        acts = 3 * w0 * side * side  # conv, norm, relu
        c_in = w0
        for w in cfg.cnn_widths:
            side //= 2
            # first block: strided conv pair + projected skip; then plain blocks
            params += c_in * w * 9 + w * w * 9 + 4 * w + c_in * w + 2 * w
            params += (cfg.cnn_blocks_per_stage - 1) * (2 * w * w * 9 + 4 * w)
            acts += cfg.cnn_blocks_per_stage * 8 * w * side * side
            c_in = w
        c, d_image = c_in, 2 * c_in
        parts["image encoder"] = (params + c + 1, acts)  # + attention score conv
    d_text = 0
    if has_text:
        h, t = cfg.lstm_hidden, cfg.max_report_tokens
        lstm = 2 * (4 * h * e + 4 * h * h + 8 * h)  # two directions, two biases each
        d_text = 2 * h
        parts["report encoder"] = (v * e + lstm + 2 * h * h + h + h,
                                   t * (e + 2 * 6 * h + 2 * h + h))
    if has_image and has_text:
        fusion = {"concat": (d_image + d_text) * f + f,
                  "gated": d_image * f + d_text * f + (d_image + d_text) * f + 3 * f,
                  "bilinear": (d_image + d_text + 2) * f * cfg.bilinear_rank + f * f + f,
                  }[cfg.fusion]
        acts = f * (cfg.bilinear_rank if cfg.fusion == "bilinear" else 3)
    else:
        fusion, acts = (d_image or d_text) * f + f, f
    parts["fusion"] = (fusion, acts)
    heads = f * k + k
    if has_image and has_text and cfg.loss_aux_image > 0:
        heads += d_image * k + k
    head_acts = 2 * f + 2 * k
    if cfg.localisation and has_image:  # GridLocaliser: conv3x3 c -> c, conv1x1 c -> 4
        heads += c * c * 9 + c + c * 4 + 4
        head_acts += (2 * c + 4) * side * side
    parts["heads"] = (heads, head_acts)
    if cfg.generation and has_image:  # shared_model/decoder.py
        hd, g, n = cfg.decoder_hidden, cfg.max_gen_tokens, side * side
        lstm = 4 * hd * (e + f + k) + 4 * hd * hd + 8 * hd
        attention = (c * hd + hd) + (hd * hd + hd) + ((hd + c) * hd + hd)
        parts["report decoder"] = (v * e + (f + k) * 2 * hd + 2 * hd + lstm + attention
                                   + hd * v + v, g * (e + f + k + 6 * hd + n + v))
    return SizeEstimate(parts)


def check_size(cfg: ModelConfig, *, where: str = "the model_config") -> SizeEstimate:
    """`ModelFileError` where `cfg` asks for more than `MAX_PARAMETERS` parameters or
    `MAX_ACTIVATIONS` activation values per case, naming the part and its fields."""
    size = estimate_size(cfg)
    if size.parameters > MAX_PARAMETERS:
        part = size.largest(0)
        raise ModelFileError(
            f"{where} asks for {size.parameters / 1e6:,.0f} million parameters "
            f"({size.parameters * 4 / 2**30:,.1f} GiB), more than the "
            f"{MAX_PARAMETERS / 1e6:,.0f} million a model file may have; most are in the "
            f"{part} ({PART_FIELDS[part]})")
    if size.activations > MAX_ACTIVATIONS:
        part = size.largest(1)
        raise ModelFileError(
            f"{where} asks for {size.activations * 4 / 2**30:,.1f} GiB of activations per "
            f"case, more than the {MAX_ACTIVATIONS * 4 / 2**30:,.0f} GiB a model file may "
            f"ask for; most are in the {part} ({PART_FIELDS[part]})")
    return size


# ------------------------------------------------------------------ the checks


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTED else text[: _QUOTED - 3] + "..."


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _read(path: Path) -> dict[str, Any]:
    """The unpickled payload (tensors and plain values only) of a bounded zip archive."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read it ({_first_line(exc)})") from None
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file")
    if size > MAX_FILE_BYTES:
        raise ModelFileError(f"{path} is {size / 2**30:,.1f} GiB, more than the "
                             f"{MAX_FILE_BYTES / 2**30:,.0f} GiB a model file may be")
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise ModelFileError(f"{path} is not a medfuse model file (not a file PyTorch "
                             "saves)") from None
    unpacked = sum(e.file_size for e in entries)
    if len(entries) > MAX_ZIP_ENTRIES or unpacked > MAX_FILE_BYTES:
        raise ModelFileError(f"{path} unpacks to {len(entries)} entries, "
                             f"{unpacked / 2**30:,.1f} GiB: more than a model file may "
                             f"({MAX_ZIP_ENTRIES} entries, {MAX_FILE_BYTES / 2**30:,.0f} GiB)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelFileError(f"{path} is not a medfuse model file (it holds Python objects "
                             "other than tensors and plain values, which are never "
                             "loaded)") from None
    except Exception as exc:  # noqa: BLE001 - zip, storage and pickle errors alike
        raise ModelFileError(f"{path} is not a medfuse model file "
                             f"({_first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path} is not a medfuse model file (it holds a "
                             f"{type(raw).__name__}, not a model payload)")
    return raw


def _refuse_checkpoint(path: Path, raw: Mapping[str, Any]) -> None:
    """A round's checkpoint (server/checkpoint.py: it holds the strategy state and every
    results row, and no labels) is not the model a tool wants: name the one it wants."""
    if "strategy" not in raw and not ("rows" in raw and "labels" not in raw):
        return
    run = (str(path.resolve().parent.parent) if path.parent.name == _CHECKPOINT_FOLDER
           else "OUTPUT")
    raise ModelFileError(f"{path} is a training checkpoint (round {_quote(raw.get('round'))}"
                         f"), not a model file; use {run}/final/model.pt")


def _model_config(path: Path, raw: object) -> ModelConfig:
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        raise ModelFileError(f"{path}: its model_config is {type(raw).__name__}, not a "
                             "table of fields")
    try:
        return ModelConfig.model_validate(dict(raw))
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        field = ".".join(str(p) for p in first["loc"])
        what = (f"model_config.{field}={_quote(first.get('input'))}: " if field
                else "model_config: ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        msg = first["msg"].removeprefix("Value error, ")
        raise ModelFileError(f"{path}: {what}{msg}{more}") from None


def _labels(path: Path, raw: object, cfg: ModelConfig) -> tuple[str, ...]:
    """Plain, short, distinct names, one per class."""
    if not isinstance(raw, list | tuple):
        raise ModelFileError(f"{path}: labels is {type(raw).__name__}, not a list of names")
    if not 2 <= len(raw) <= MAX_CLASSES:
        raise ModelFileError(f"{path}: labels has {len(raw)} names; a model file has 2 to "
                             f"{MAX_CLASSES}")
    for i, label in enumerate(raw):
        if problem := label_problem(label):
            raise ModelFileError(f"{path}: labels[{i}]={_quote(label)} {problem}; {LABEL_RULE}")
    if len(set(raw)) != len(raw):
        twice = next(lab for lab in raw if raw.count(lab) > 1)
        raise ModelFileError(f"{path}: labels holds {_quote(twice)} more than once")
    if len(raw) != cfg.num_classes:
        raise ModelFileError(f"{path}: labels has {len(raw)} names but "
                             f"model_config.num_classes={cfg.num_classes}")
    return tuple(raw)


def _weights(path: Path, raw: object, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights, once every name, shape and dtype is the one `cfg` builds."""
    # readers of FORMAT and payload (server.checkpoint, the dashboard) never build a model
    # lazy: the model module loads opacus (seconds)
    from shared_model.model import MedFuseModel

    if not isinstance(raw, Mapping):
        raise ModelFileError(f"{path}: model (the weights) is {type(raw).__name__}, not a "
                             "table of tensors")
    with torch.device("meta"):  # shapes and dtypes only: no memory is allocated
        reference = MedFuseModel(cfg)
    expected = reference.state_dict()
    # names under which DPLSTM registers a weight a second time (older files hold both)
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in reference.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    where = f"{path}: its weights do not fit its model_config"
    for name, tensor in raw.items():
        ref = expected.get(aliases.get(name, name)) if isinstance(name, str) else None
        if ref is None:
            raise ModelFileError(f"{where}: model.{_quote(name)} is not part of that model")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ModelFileError(f"{where}: model.{name} is {type(tensor).__name__}, not a "
                                 "dense tensor")
        if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
            raise ModelFileError(
                f"{where}: model.{name} is {tuple(tensor.shape)} {tensor.dtype}, the config "
                f"builds {tuple(ref.shape)} {ref.dtype}")
    missing = [name for name in expected if name not in raw]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFileError(f"{where}: model.{missing[0]} is missing{more}")
    return dict(raw)
