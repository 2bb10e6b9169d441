"""Checkpoints after every round, resume after a crash, and the final model (no Flower).

Layout under the run's output folder:

    checkpoints/round-0001.pt ...   one per finished round (global model + strategy state)
    checkpoints/latest              text: the file name of the newest complete checkpoint
    final/model.pt                  the final global model, self-describing
    final/model_card.json / .md     config, label set, sites, rounds, epsilon, metrics

Every file is written atomically: a temporary file in the same folder, fsync, then
`os.replace`, so a crash leaves either the old file or the new one, never half of one.

A checkpoint describes itself (nanoGPT keeps `model_args` and `iter_num` beside the
weights): `torch.load(path, weights_only=True)` gives a dict with

    format, round, model (name -> tensor: the whole state_dict that crosses the wire),
    model_config, run_config, strategy (the strategy state that matters on resume),
    rows (every results row so far), code_version, created

and `final/model.pt` the same minus the strategy state, so
`MedFuseModel(ModelConfig(**ck["model_config"])).load_state_dict(ck["model"])` works.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.results import (
    EVALUATE,
    TRAIN,
    Row,
    central_epsilon,
    epsilon_spent,
    final_metrics,
    sites_of,
)
from shared_model.contract import wire
from shared_model.contract.metric_registry import METRICS
from shared_model.files import atomic_write, atomic_write_text
from shared_model.model_file import FORMAT, payload  # one format for every model file

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
FINAL_DIR = "final"
_NAME = re.compile(r"^round-(\d{4,})\.pt$")


def checkpoint_name(server_round: int) -> str:
    return f"round-{server_round:04d}.pt"


# ------------------------------------------------------------------ code version


def code_version() -> str:
    """`medfuse <version> src:<digest>`: the package version and a digest of the source
    files of the app (server, client, shared_model and pyproject), so two checkpoints
    from different code never look alike."""
    try:
        version = metadata.version("medfuse")
    except metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    files = [root / "pyproject.toml"]
    for pkg in ("server", "client", "shared_model"):
        files += sorted((root / pkg).glob("*.py"))
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return f"medfuse {version} src:{digest.hexdigest()[:12]}"


# ------------------------------------------------------------------ state <-> torch


def _to_torch(obj: Any) -> Any:
    """numpy arrays -> tensors, recursively, so `torch.load(weights_only=True)` reads it."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_torch(v) for v in obj)
    return obj


def _to_numpy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, Mapping):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


# ------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A finished round: everything a resumed run needs to continue as if never stopped."""

    round: int
    arrays: dict[str, np.ndarray]  # the global state_dict as numpy, in state_dict order
    model_config: dict[str, Any]
    run_config: dict[str, Any]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    code_version: str = ""
    created: float = 0.0
    path: Path | None = None


_ROW_FIELDS = tuple(f.name for f in fields(Row))


def _row_dict(row: Row) -> dict[str, Any]:
    """`dataclasses.asdict(row)` (the same keys, order and values) without its deep copy
    of every value: a checkpoint holds every row so far, so a long run's last ones hold
    hundreds of thousands (asdict took ~5.5 us a row here, this ~0.5 us)."""
    return {name: getattr(row, name) for name in _ROW_FIELDS}


def save_checkpoint(output_dir: Path, ck: Checkpoint) -> Path:
    """Write `checkpoints/round-NNNN.pt` atomically, then point `latest` at it."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    path = folder / checkpoint_name(ck.round)
    payload = {
        "format": FORMAT,
        "round": int(ck.round),
        "model": _to_torch(dict(ck.arrays)),
        "model_config": dict(ck.model_config),
        "run_config": dict(ck.run_config),
        "strategy": _to_torch(dict(ck.strategy_state)),
        "rows": [_row_dict(r) for r in ck.rows],
        "code_version": ck.code_version or code_version(),
        "created": ck.created or time.time(),
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))
    atomic_write_text(folder / LATEST, path.name + "\n")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read one checkpoint file (tensors only: never unpickles arbitrary objects)."""
    raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a medfuse checkpoint of format {FORMAT}")
    return Checkpoint(
        round=int(raw["round"]),
        arrays={k: v.numpy() for k, v in raw["model"].items()},
        model_config=dict(raw["model_config"]),
        run_config=dict(raw["run_config"]),
        strategy_state=_to_numpy(raw["strategy"]),
        rows=[Row.from_dict(d) for d in raw["rows"]],
        code_version=str(raw["code_version"]),
        created=float(raw["created"]),
        path=Path(path),
    )


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint files under `output_dir`, oldest round first."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(output_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint: the one `latest` names, else the highest round that
    loads (a crash between writing a checkpoint and its pointer loses nothing). None when
    there is none."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    candidates = list(reversed(list_checkpoints(output_dir)))
    pointer = folder / LATEST
    if pointer.is_file():
        named = folder / pointer.read_text(encoding="utf-8").strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    best: Checkpoint | None = None
    for path in candidates:
        try:
            ck = load_checkpoint(path)
        except Exception:  # noqa: BLE001 - a torn or foreign file: try the next one
            continue
        if best is None or ck.round > best.round:
            best = ck
    return best


# ------------------------------------------------------------------ final model + card


def build_model_card(
    *,
    model_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    labels: Sequence[str],
    rounds: int,
    rows: Sequence[Row],
    strategy: str,
    version: str,
) -> dict[str, Any]:
    """What the final model is and how it was made: config, labels, sites, rounds, the
    epsilon each site spent and the final metrics per site and their mean."""
    eps = epsilon_spent(rows)
    private_metrics = {r.site: bool(r.value) for r in rows
                       if r.phase == EVALUATE and r.metric == wire.M_PRIVATE_METRICS}
    return {
        "name": "medfuse",
        "code_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "strategy": strategy,
        "rounds": int(rounds),
        "labels": list(labels),
        "sites": sites_of(rows),
        "privacy": {
            "dp": bool(run_config.get("dp", False)),
            "delta": run_config.get("delta"),
            "epsilon_budget_per_site": run_config.get("epsilon"),
            "epsilon_spent_per_site": eps,
            "evaluation_epsilon_per_site": epsilon_spent(rows, wire.M_EVAL_EPSILON),
            "metrics_are_private_releases": private_metrics,
            "epsilon_covers": PRIVACY_COVERS,
            "released_without_dp": list(RELEASED_WITHOUT_DP),
            "central_dp": _central_dp_card(run_config, rows),
        },
        "final_metrics": final_metrics(rows),
        "model_config": dict(model_config),
        "run_config": dict(run_config),
        "input": _input_spec(model_config),
        "site_sizes": _site_sizes(rows),
        "started_from": _started_from(run_config),
        "intended_use": INTENDED_USE,
        "limits": list(LIMITS),
    }


INTENDED_USE = (
    "research and evaluation of federated, privacy-preserving disease analysis on chest "
    "images with reports; not a medical device, not for clinical decisions")
LIMITS = (
    "trained and evaluated only on the sites listed; its metrics say nothing about other "
    "scanners, populations or label definitions",
    "the metrics of sites that evaluate under DP are noised releases (see privacy)",
    "generated descriptions are written from the image alone and are not reports",
)


def _input_spec(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """What an image must be to be read as in training (dataset format v1)."""
    # startup time: only the model card needs it, not the readers of checkpoints (resume,
    # the coordinator's tools, the dashboard)
    # lazy: the dataset module loads pandas and PIL (0.3 s)
    from shared_model.dataset import IMAGE_EXTENSIONS, PIXEL_MEAN, PIXEL_STD

    return {"image_size": model_config.get("image_size"),
            "channels": model_config.get("in_channels"),
            "formats": list(IMAGE_EXTENSIONS),
            "bit_depth": "scaled by the file's own depth (8/16-bit PNG, DICOM BitsStored)",
            "normalisation": f"(x - {PIXEL_MEAN}) / {PIXEL_STD} on [0, 1], the same at "
                             "every site", "report_tokens": model_config.get("max_report_tokens")}


def _site_sizes(rows: Sequence[Row]) -> dict[str, float]:
    """Each site's training-split size as it released it (noised under DP)."""
    sizes: dict[str, float] = {}
    for r in rows:
        if r.phase == TRAIN and r.metric == wire.M_NUM_EXAMPLES:
            sizes[r.site] = r.value
    return sizes


def _started_from(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The public model the federation started from (its corpus digest), or random."""
    path = run_config.get("initial-model") or ""
    if not path:
        return {"initial_model": "random initialisation"}
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a moved or unreadable file: the path is still worth recording
        return {"initial_model": path}
    return {"initial_model": path, "corpus_sha256": meta.get("corpus_sha256"),
            "source": meta.get("source")}


def _central_dp_card(run_config: Mapping[str, Any], rows: Sequence[Row]) -> dict[str, Any]:
    """Client-level DP of the federation (a whole hospital's contribution), beside each
    site's sample-level epsilon (one patient's)."""
    mode = run_config.get("central-dp", "off")
    if mode == "off":
        return {"mode": "off"}
    return {"mode": mode, "noise_multiplier": run_config.get("central-noise"),
            "clipping_norm": run_config.get("central-clip"),
            "epsilon": central_epsilon(rows), "delta": run_config.get("delta"),
            "covers": "everything the federation's model holds about any one hospital's "
                      "data, against whoever receives the model (not against the server, "
                      "which adds the noise)"}


# What a site's epsilon covers and what it does not: the same list as docs/privacy.md.
PRIVACY_COVERS = (
    "each site's training epsilon covers every model update it sent and the noised size of "
    "its training split; its evaluation epsilon covers the noised metrics of its val/test "
    "splits (both per case, add/remove-one adjacency, at the site's delta)"
)
RELEASED_WITHOUT_DP = (
    "that a site took part in a round, its name, and when it replied (timing follows the "
    "size of the site and of its Poisson batches), and the seconds it says the message "
    "took (`seconds`: the same information, without the network and polling)",
    "`unit-weight`, always 1 (the equal weights client-level DP averages with)",
    "why a site did not take part (budget spent, data unusable, a round it refuses)",
    "the epsilon, delta and budget figures themselves (computed from what was released)",
    "exact evaluation metrics where a site's node config says evaluation='exact' (its "
    "ledger records them as infinite epsilon), and everything a site released in a round "
    "it trained with dp=false (allowed only by its own node config; infinite epsilon)",
)

_CARD_METRICS = (wire.M_NUM_EXAMPLES, *(m.name for m in METRICS))


def _md_num(v: Any) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def model_card_markdown(card: Mapping[str, Any]) -> str:
    lines = [
        "# medfuse model card",
        "",
        f"- code: `{card['code_version']}`",
        f"- strategy: `{card['strategy']}`, rounds: {card['rounds']}",
        f"- labels: {', '.join(card['labels'])}",
        f"- sites: {', '.join(card['sites']) or '(none reported)'}",
        f"- differential privacy: {'on' if card['privacy']['dp'] else 'off'}, "
        f"budget epsilon={card['privacy']['epsilon_budget_per_site']} per site, "
        f"delta={card['privacy']['delta']}",
        f"- started from: {card.get('started_from', {}).get('initial_model', '-')}",
        f"- input: {card.get('input', {}).get('image_size')} px, "
        f"{card.get('input', {}).get('normalisation', '')}",
        f"- intended use: {card.get('intended_use', INTENDED_USE)}",
        *[f"- limit: {item}" for item in card.get("limits", ())],
        "",
        "## Privacy",
        "",
        f"What epsilon covers: {card['privacy'].get('epsilon_covers', PRIVACY_COVERS)}.",
        "",
        "Released without differential privacy (see docs/privacy.md):",
        "",
        *[f"- {item}" for item in card["privacy"].get("released_without_dp", ())],
        "",
        "## Final metrics (global model on each site's held-out split)",
        "",
    ]
    metrics = card["final_metrics"]
    reported = {m for d in metrics.values() for m in d}
    names = [m for m in _CARD_METRICS if m in reported]
    if names:
        lines.append("| site | epsilon spent | " + " | ".join(names) + " |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in names) + " |")
        eps = card["privacy"]["epsilon_spent_per_site"]
        for site, d in metrics.items():
            e = _md_num(eps[site]) if site in eps else ""
            lines.append(
                f"| {site} | {e} | " + " | ".join(_md_num(d.get(m, "")) for m in names) + " |"
            )
    else:
        lines.append("(no evaluation results)")
    lines += ["", "## Model config", "", "```json",
              json.dumps(card["model_config"], indent=2), "```", ""]
    return "\n".join(lines)


def write_final(
    output_dir: Path,
    *,
    arrays: Mapping[str, np.ndarray],
    card: Mapping[str, Any],
) -> Path:
    """`final/model.pt` (weights + config + labels + round + version) and the model card
    as JSON and Markdown. Returns the final folder."""
    folder = Path(output_dir) / FINAL_DIR
    blob = payload(
        _to_torch(dict(arrays)), card["model_config"], card["labels"],
        round=int(card["rounds"]), run_config=dict(card["run_config"]),
        code_version=card["code_version"], created=time.time(),
    )
    atomic_write(folder / "model.pt", lambda fh: torch.save(blob, fh))
    atomic_write_text(
        folder / "model_card.json",
        json.dumps(_finite(card), indent=2, allow_nan=False, default=_json_default) + "\n",
    )
    atomic_write_text(folder / "model_card.md", model_card_markdown(card))
    return folder


def _finite(obj: Any) -> Any:
    """NaN/Inf -> None, so the card is strict JSON (an undefined metric reads as null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple | set):
        return list(obj)
    return str(obj)
