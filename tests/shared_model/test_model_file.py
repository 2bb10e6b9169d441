"""Model files are data: a file from anyone is checked (size, archive, kind, config bounds,
labels, the size its config asks for, the weights' names and shapes) before anything is
built or loaded, and each refusal is one line naming the file and the field."""

from __future__ import annotations

import itertools
import pickle
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.model import MedFuseModel
from shared_model.model_file import (
    MAX_FILE_BYTES,
    ModelFileError,
    check_size,
    estimate_size,
    load_model_file,
    payload,
)

CFG = ModelConfig.small(image_size=32)


def _save(path: Path, blob: object) -> Path:
    torch.save(blob, path)
    return path


def _model(path: Path, cfg: ModelConfig = CFG, labels=DEFAULT_LABELS, state=None,
           **meta: object) -> Path:
    torch.manual_seed(0)
    state = MedFuseModel(cfg).state_dict() if state is None else state
    return _save(path, payload(state, cfg, labels, **meta))


def _refusal(path: Path, *needles: str) -> str:
    """The refusal of `path`: one line, naming the file and every needle."""
    with pytest.raises(ModelFileError) as info:
        load_model_file(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ------------------------------------------------------------------ what loads


def test_a_model_file_written_by_payload_loads_with_or_without_the_lstm_aliases(
    tmp_path: Path,
):
    # Prepare: the current format, and an older file holding DPLSTM's second names too
    torch.manual_seed(0)
    model = MedFuseModel(CFG)
    aliased = dict(model.named_parameters(remove_duplicate=False))
    assert len(aliased) > len(model.state_dict())
    # Execute
    new = load_model_file(_model(tmp_path / "new.pt", round=3))
    old = load_model_file(_save(tmp_path / "old.pt", payload(aliased, CFG, DEFAULT_LABELS)))
    # Assert
    assert new.labels == DEFAULT_LABELS and new.model_config == CFG and new.meta["round"] == 3
    for loaded in (new, old):
        fresh = MedFuseModel(CFG)
        fresh.load_state_dict(loaded.state, strict=True)
        assert all(torch.equal(fresh.state_dict()[k], v)
                   for k, v in model.state_dict().items())


@pytest.mark.parametrize("fusion,modality,preset,loc",
                         list(itertools.product(("concat", "gated", "bilinear"),
                                                ("fused", "image", "text"),
                                                ("small", "large"), (True, False))))
def test_the_size_estimate_is_the_built_models_parameter_count(
    fusion: str, modality: str, preset: str, loc: bool
):
    # Prepare
    cfg = getattr(ModelConfig, preset)(fusion=fusion, modality=modality, localisation=loc,
                                       generation=modality != "text")
    # Execute
    with torch.device("meta"):
        built = MedFuseModel(cfg)
    # Assert
    assert estimate_size(cfg).parameters == sum(p.numel() for p in built.parameters())


def test_every_model_a_run_config_can_ask_for_is_within_the_caps():
    # Prepare: the run config's model sizes, image sizes up to its 1024 px limit
    for preset, side, fusion, modality in itertools.product(
        ("small", "large"), (16, 32, 64, 128, 224, 256, 512, 1024),
        ("concat", "gated", "bilinear"), ("fused", "image", "text")
    ):
        if side % (16 if preset == "large" else 8):
            continue
        cfg = getattr(ModelConfig, preset)(image_size=side, fusion=fusion,
                                           modality=modality, generation=modality != "text")
        # Execute / Assert
        check_size(cfg)


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize("overrides,field", [
    ({"vocab_size": 10**9}, "model_config.vocab_size=1000000000"),
    ({"embed_dim": 1 << 20}, "model_config.embed_dim"),
    ({"cnn_widths": [8] * 9, "image_size": 1024}, "model_config.cnn_widths"),
    ({"cnn_widths": [16, 1 << 16]}, "model_config.cnn_widths.1"),
    ({"fused_dim": 10**6}, "model_config.fused_dim"),
    ({"bilinear_rank": 4096}, "model_config.bilinear_rank"),
    ({"num_classes": 10**6}, "model_config.num_classes"),
    ({"decoder_hidden": 10**6}, "model_config.decoder_hidden"),
    ({"lstm_hidden": 10**6}, "model_config.lstm_hidden"),
    ({"no_such_field": 1}, "model_config.no_such_field"),
])
def test_a_config_field_out_of_bounds_is_refused_naming_the_field(
    tmp_path: Path, overrides: dict, field: str
):
    # Prepare: a small file, no weights needed to be refused
    cfg = {**CFG.model_dump(), **overrides}
    path = _save(tmp_path / "m.pt", payload({}, cfg, DEFAULT_LABELS))
    # Execute / Assert
    _refusal(path, field)


@pytest.mark.parametrize("overrides,part", [
    # each field within its bounds, their product ~490 M parameters (1.8 GiB)
    ({"vocab_size": 65536, "embed_dim": 2048, "fused_dim": 4096, "decoder_hidden": 2048},
     "report decoder"),
    # 1024 px through 1024-channel stages: ~22 GiB of activations for one case
    ({"image_size": 1024, "cnn_widths": [1024, 1024]}, "image encoder"),
    ({"fusion": "bilinear", "fused_dim": 4096, "bilinear_rank": 64,
      "cnn_widths": [1024, 1024, 1024]}, "fusion"),
])
def test_a_2kb_file_asking_for_a_huge_model_is_refused_fast_without_building_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict, part: str
):
    # Prepare: a tiny file; count every module that gets built
    path = _save(tmp_path / "huge.pt", payload({}, {**CFG.model_dump(), **overrides},
                                               DEFAULT_LABELS))
    assert path.stat().st_size < 2048
    built: list[str] = []
    original = nn.Module.__init__

    def counting(self: nn.Module, *args: object, **kwargs: object) -> None:
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", counting)
    # Execute
    start = time.perf_counter()
    message = _refusal(path, "model_config asks for", part)
    elapsed = time.perf_counter() - start
    # Assert
    assert elapsed < 1.0 and built == []
    assert "GiB" in message


# ------------------------------------------------------------------ labels


@pytest.mark.parametrize("labels,needle", [
    (["", "b", "c", "d", "e"], "labels[0]='' is empty"),
    (["a" * 65, "b", "c", "d", "e"], "is longer than 64"),
    (["a", "b\x1b[2J", "c", "d", "e"], "labels[1]='b\\x1b[2J' has a control"),
    (["a", "b\nc", "c", "d", "e"], "has a control"),
    (["a", "b\u202ec", "c", "d", "e"], "has a control or formatting"),
    (["a", "b,c", "c", "d", "e"], "has a comma"),
    (["a", " b", "c", "d", "e"], "leading or trailing space"),
    (["a", 7, "c", "d", "e"], "labels[1]=7 is not a string"),
    (["a", "a", "c", "d", "e"], "labels holds 'a' more than once"),
    (["a", "b", "c", "d"], "labels has 4 names but model_config.num_classes=5"),
    (["a"], "labels has 1 names; a model file has 2 to 1000"),
    ("abcde", "labels is str"),
])
def test_a_label_that_is_not_a_plain_name_is_refused(tmp_path: Path, labels, needle: str):
    # Prepare
    path = _save(tmp_path / "m.pt", payload(MedFuseModel(CFG).state_dict(), CFG, ()) | {
        "labels": labels})
    # Execute / Assert
    _refusal(path, needle)


def test_labels_that_are_formulas_or_markup_load_as_plain_names(tmp_path: Path):
    """Printable names load (the CSV and the gallery neutralise them where they are shown:
    tests/client/test_predict.py)."""
    labels = ("=1+1", "+a", "-b", "@c", "<b>x</b>")
    assert load_model_file(_model(tmp_path / "m.pt", labels=labels)).labels == labels


# ------------------------------------------------------------------ weights


def _state() -> dict[str, torch.Tensor]:
    return dict(MedFuseModel(CFG).state_dict())


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.update({"image.stem.0.weight": torch.zeros(3)}),
     "model.image.stem.0.weight is (3,) torch.float32, the config builds (16, 1, 3, 3)"),
    (lambda s: s.update({"classifier.bias": torch.zeros(5, dtype=torch.float64)}),
     "model.classifier.bias is (5,) torch.float64"),
    (lambda s: s.pop("classifier.weight"), "model.classifier.weight is missing"),
    (lambda s: s.update({"backdoor": torch.zeros(1)}), "'backdoor' is not part"),
    (lambda s: s.update({"classifier.bias": [0.0] * 5}), "model.classifier.bias is list"),
    (lambda s: s.update({"classifier.bias": torch.zeros(5).to_sparse()}), "not a dense"),
])
def test_weights_that_do_not_fit_the_config_are_refused_before_loading(
    tmp_path: Path, edit, needle: str
):
    # Prepare
    state = _state()
    edit(state)
    path = _save(tmp_path / "m.pt", {**payload({}, CFG, DEFAULT_LABELS), "model": state})
    # Execute / Assert
    _refusal(path, "its weights do not fit its model_config", needle)


# ------------------------------------------------------------------ what is not a model


def test_a_training_checkpoint_is_named_as_one_with_its_runs_final_model(tmp_path: Path):
    from server.checkpoint import Checkpoint, save_checkpoint

    # Prepare: a real round checkpoint (server/checkpoint.py's format)
    arrays = {k: v.numpy() for k, v in _state().items()}
    path = save_checkpoint(tmp_path / "run", Checkpoint(
        round=4, arrays=arrays, model_config=CFG.model_dump(), run_config={"rounds": 5},
        strategy_state={"m": np.zeros(2)}))
    # Execute / Assert
    _refusal(path, "is a training checkpoint (round 4)",
             f"use {(tmp_path / 'run').resolve()}/final/model.pt")
    # elsewhere than OUTPUT/checkpoints the run folder is not known
    moved = path.rename(tmp_path / "ck.pt")
    _refusal(moved, "use OUTPUT/final/model.pt")


class _Payload:  # an object a weights-only load refuses to build
    pass


def _zip_bomb(path: Path) -> Path:
    """A small archive whose one entry claims to unpack to ~4 GiB (headers edited)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * 1000)
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature) + offset
        data[at:at + 4] = struct.pack("<I", 0xFFFFFFF0)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200)), "not a file PyTorch saves"),
    (lambda p: p.write_bytes(b""), "not a file PyTorch saves"),
    (lambda p: p.write_text("labels: a, b\n"), "not a file PyTorch saves"),
    (lambda p: torch.save([1, 2], p), "it holds a list"),
    (lambda p: torch.save({"format": 1, "model": {}, "model_config": {},
                           "labels": ["a", "b"], "x": _Payload()}, p),
     "Python objects other than tensors"),
    (lambda p: p.write_bytes(pickle.dumps({"format": 1})), "not a file PyTorch saves"),
    (lambda p: torch.save({"format": 1}, p), "no weights or no model_config"),
    (lambda p: torch.save(payload({}, CFG, DEFAULT_LABELS) | {"format": 9}, p),
     "model file format 9; this medfuse reads format 2"),
    (lambda p: torch.save(payload({}, CFG, DEFAULT_LABELS) | {"model_config": [1]}, p),
     "model_config is list"),
    (_zip_bomb, "unpacks to 1 entries, 4.0 GiB"),
])
def test_a_file_that_is_not_a_model_is_refused_in_one_line(tmp_path: Path, make, needle):
    # Prepare
    path = tmp_path / "model.pt"
    make(path)
    # Execute / Assert
    message = _refusal(path, needle)
    assert "weights_only" not in message


def test_a_missing_file_a_folder_and_an_oversized_file_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import shared_model.model_file as model_file

    _refusal(tmp_path / "absent.pt", "no such file")
    _refusal(tmp_path, "is a folder")
    path = _model(tmp_path / "m.pt")
    monkeypatch.setattr(model_file, "MAX_FILE_BYTES", path.stat().st_size - 1)
    _refusal(path, "more than the")
    assert MAX_FILE_BYTES == 1 << 30


@pytest.mark.parametrize("bad", ["x" * 65, "tab\there"])
def test_a_run_cannot_train_under_a_label_its_model_file_would_refuse(bad: str) -> None:
    # Prepare: a run config whose label set holds a name a model file refuses
    from shared_model.contract.run_config import RunConfig, RunConfigError, pyproject_defaults

    flat = {**pyproject_defaults(), "labels": f"normal,{bad}"}
    # Execute / Assert: refused at start, naming the labels (not after training)
    with pytest.raises(RunConfigError, match="labels"):
        RunConfig.parse(flat)
