"""`medfuse bench`: what privacy and the federation cost on top of the training itself,
measured on the machine it runs on, printed beside each goal and written to bench.json.

Figures (each with the settings it was measured under):

- `dp_step_ratio`: the time of one DP-SGD step (the product's own `make_private`: Poisson
  batches, per-sample gradients, clipping, noise) over one plain SGD step, same model and
  batch; also with fewer trained layers (`no-embeddings`, `heads`: fewer per-sample
  gradients). Medians over repeated steps after a warm-up.
- `sim_round_overhead`: a round's wall time at the server over the slowest hospital's own
  compute that round (its train and evaluate seconds, which each node reports), in a small
  simulation through Flower's engine; the median over rounds after the first.
- `bytes_per_round_ratio`: the array bytes one site receives and sends in a round with
  medfuse's messages (the global model in the train message, the update back, the model
  again in the evaluate message) over 2 x the model's parameter bytes (one model down, one
  update up). Counted from the ArrayRecords the apps build, not from a network trace.

Timing is noisy on a shared machine: a figure here is a measurement, never a test.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

GOALS = {"dp_step_ratio": ("<=", 2.0), "bytes_per_round_ratio": ("<=", 1.05),
         "sim_round_overhead": ("<=", 1.10)}


@dataclass(frozen=True)
class Figure:
    key: str
    value: float
    settings: dict[str, object]

    def goal(self) -> str:
        if self.key not in GOALS:
            return ""
        op, target = GOALS[self.key]
        met = self.value <= target if op == "<=" else self.value >= target
        return f"{op} {target:g} ({'met' if met else 'not met'})"


def _median_seconds(step: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench_site(image_size: int, cases: int, workdir: Path):
    from shared_model.config import DEFAULT_LABELS, ModelConfig
    from shared_model.dataset import open_site
    from shared_model.synth import SynthConfig, write_federation
    from shared_model.tokenizer import Tokenizer

    cfg = ModelConfig.small(image_size=image_size)
    (site_dir,) = write_federation(workdir / "bench-site", SynthConfig(
        sites=1, cases_per_site=cases, seed=3, image_size=image_size), overwrite=True)
    return cfg, open_site(site_dir, labels=DEFAULT_LABELS, model=cfg,
                          tokenizer=Tokenizer(cfg.vocab_size))


def dp_step_figures(image_size: int = 64, batch: int = 32, repeats: int = 10,
                    workdir: Path = Path("bench-data")) -> list[Figure]:
    """DP-SGD step time over plain step time, for all layers and for fewer."""
    from client.local import DPSettings, RoundPlan, make_private
    from client.privacy import LedgerStore, data_identity
    from shared_model.batch import Batch
    from shared_model.model import MedFuseModel, freeze
    from shared_model.train import make_loss_fn

    cfg, site = _bench_site(image_size, max(4 * batch, 64), workdir)
    loss_fn = make_loss_fn(cfg)
    fixed = Batch.of(next(iter(torch.utils.data.DataLoader(site.train, batch_size=batch))))

    def plain_step(layers: str) -> Callable[[], object]:
        model = MedFuseModel(cfg).train()
        freeze(model, layers)  # type: ignore[arg-type]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)

        def step() -> None:
            opt.zero_grad()
            out = model(fixed.image, fixed.tokens, fixed.gen_tokens)
            loss_fn(out, fixed)[0].backward()
            opt.step()
        return step

    def dp_step(layers: str) -> Callable[[], object]:
        model = MedFuseModel(cfg).train()
        freeze(model, layers)  # type: ignore[arg-type]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        n = len(site.train)
        plan = RoundPlan(released_n=n, noise_multiplier=1.0, sample_rate=batch / n,
                         steps=1, epsilon_after=math.inf)
        store = LedgerStore(workdir / "bench-ledger")
        with store.lock():
            ledger = store.open(data_identity(site.path), site_name="bench",
                                data_path=site.path, epsilon_budget=1e9,
                                eval_epsilon_budget=1.0, delta=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, dp_opt, _, _ = make_private(model, opt, site.train, plan, DPSettings(),
                                             ledger, torch.device("cpu"))

        def step() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dp_opt.zero_grad()
                out = net(fixed.image, fixed.tokens, fixed.gen_tokens)
                loss_fn(out, fixed)[0].backward()
                dp_opt.step()
        return step

    figures = []
    for layers in ("all", "no-embeddings", "heads"):
        plain = _median_seconds(plain_step(layers), repeats)
        dp = _median_seconds(dp_step(layers), repeats)
        key = "dp_step_ratio" if layers == "all" else f"dp_step_ratio_{layers.replace('-', '_')}"
        figures.append(Figure(key, dp / plain, {
            "model": "small", "image_size": image_size, "batch": batch, "layers": layers,
            "plain_step_s": round(plain, 4), "dp_step_s": round(dp, 4),
            "grad_sample_mode": "hooks", "threads": torch.get_num_threads()}))
    return figures


def bytes_figures(image_size: int = 64) -> list[Figure]:
    """Array bytes per site and round with medfuse's messages, over 2 x parameter bytes."""
    from shared_model.config import ModelConfig
    from shared_model.model import MedFuseModel

    model = MedFuseModel(ModelConfig.small(image_size=image_size))
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    seen: set[int] = set()
    param_bytes = 0
    for p in model.parameters():  # each stored tensor once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            param_bytes += p.numel() * p.element_size()
    per_round = 3 * state_bytes  # train down, update up, evaluate down
    return [Figure("bytes_per_round_ratio", per_round / (2 * param_bytes), {
        "state_dict_bytes": state_bytes, "parameter_bytes": param_bytes,
        "state_dict_keys": len(model.state_dict()), "messages_with_arrays": 3,
        "parameters": sum(p.numel() for p in model.parameters())})]


SIM_CONFIG = """
name = "bench: simulated rounds"
seeds = [0]
[sites]
source = "synthetic"
count = {sites}
cases-per-site = {cases}
seed = 0
[model]
image-size = {image_size}
[training]
rounds = {rounds}
[resources]
client-cpus = 1
[[experiment]]
name = "fedavg-dp"
kind = "federated"
dp = true
epsilon = 8.0
"""


def sim_round_figures(out: Path, *, sites: int = 2, cases: int = 60, image_size: int = 32,
                      rounds: int = 3) -> list[Figure]:
    """A small simulation through Flower's engine: each round's wall time at the server
    over the slowest hospital's own compute (its train + evaluate seconds) that round."""
    from rich.console import Console

    from server.results import FEDERATION, read_rows
    from server.strategy import ROUND_SECONDS
    from shared_model import wire
    from simulations.config import load_config
    from simulations.runner import Runner

    cfg_file = out / "sim.toml"
    cfg_file.write_text(SIM_CONFIG.format(sites=sites, cases=cases, image_size=image_size,
                                          rounds=rounds), encoding="utf-8")
    cfg = load_config(cfg_file, out=out / "sim")
    Runner(cfg, console=Console(quiet=True), progress=False).run()
    rows = read_rows(out / "sim" / "experiments" / "fedavg-dp" / "seed-0" / "results.jsonl")
    ratios, walls, computes = [], [], []
    for rnd in sorted({r.round for r in rows}):
        wall = [r.value for r in rows if r.round == rnd and r.site == FEDERATION
                and r.metric == ROUND_SECONDS]
        per_site: dict[str, float] = {}
        for r in rows:
            if r.round == rnd and r.metric == wire.M_SECONDS and r.site != FEDERATION:
                per_site[r.site] = per_site.get(r.site, 0.0) + r.value
        if wall and per_site:
            walls.append(wall[0])
            computes.append(max(per_site.values()))
            ratios.append(wall[0] / max(per_site.values()))
    # the first round pays for starting the ClientApps (imports, the first decode)
    steady = ratios[1:] or ratios
    return [Figure("sim_round_overhead", statistics.median(steady), {
        "hospitals": sites, "cases_per_site": cases, "image_size": image_size,
        "rounds": rounds, "round_wall_s": [round(w, 2) for w in walls],
        "slowest_site_compute_s": [round(c, 2) for c in computes],
        "first_round_ratio": round(ratios[0], 3) if ratios else None})]


def run_bench(out: Path, *, quick: bool = False, image_size: int = 64,
              echo: Callable[[str], object] = print) -> list[Figure]:
    """Every figure, printed as it is measured, then bench.json under `out`."""
    from shared_model.files import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    figures: list[Figure] = []
    steps: list[Callable[[], list[Figure]]] = [
        lambda: bytes_figures(image_size),
        lambda: dp_step_figures(image_size=image_size, repeats=3 if quick else 10,
                                workdir=out / "data"),
        lambda: sim_round_figures(out, rounds=2 if quick else 4),
    ]
    for measure in steps:
        for fig in measure():
            figures.append(fig)
            echo(f"{fig.key:32s} {fig.value:8.3f}  {fig.goal()}")
    payload = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "cpus": torch.get_num_threads()},
               "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               **{f.key: {"value": f.value, "goal": f.goal(), "settings": f.settings}
                  for f in figures}}
    atomic_write_text(out / "bench.json", json.dumps(payload, indent=2) + "\n")
    echo(f"written: {out / 'bench.json'}")
    return figures
