"""`medfuse bench`: what privacy and the federation cost on top of the training itself,
measured on the machine it runs on, printed beside each goal and written to bench.json.

Figures (each with the settings it was measured under):

- `dp_step_ratio`: the time of one DP-SGD step (the product's own `make_private`: Poisson
  batches, per-sample gradients, clipping, noise) over one plain SGD step, same model and
  batch; also with fewer trained layers (`no-embeddings`, `heads`: fewer per-sample
  gradients). Per-example gradients by `shared_model.grad_samplers` (the default), and
  `dp_step_ratio_hooks`: the same step with Opacus' hooks. The steps alternate within
  each repeat; medians over the repeats after a warm-up.
- `sim_round_overhead`: a round's wall time at the server over the slowest hospital's own
  compute that round (the seconds each node reports for its messages), in a small
  simulation through Flower's engine; the median over the rounds between the first
  (ClientApps start) and the last (it also evaluates the final model). A round is one
  train message, which also evaluates the model it carries (`evaluate-with-train`).
- `secagg_round_extra_s`: the seconds a round takes longer with secure aggregation
  (Flower's SecAgg+: four exchanges with every node, and evaluation in a message of its
  own) than the same DP FedAvg round without it, in the same simulation; the median over
  rounds after the first.
- `deploy_round_overhead_s`: seconds per round beyond the slowest hospital's own compute
  in `medfuse deploy local` (real SuperLink and SuperNodes, TLS, node auth; 2 hospitals,
  60 cases, 32 px; ClientApp processes forked warm by `client/warm_exec.py`; arrays not
  there yet asked for again within 20-250 ms, `shared_model/contract/pulls.py`); the
  median over the middle rounds, with what a cold ClientApp process takes to start
  (`import client.app`: what Flower's own SuperExec pays per message) and the
  SuperNode's fixed poll beside it.
- `hospitals_max`: the largest simulated federation that ran (10, 50, 100, 200 small
  hospitals, one DP round of 4 sampled hospitals), with the peak memory of the whole
  process tree and the round time of each size, and a plot of both (goal: 200 within 8 GB).
- `hospitals_all_train`: the same federations with every hospital sampled (fraction 1.0):
  all of them train and evaluate in the round; the largest that ran with every hospital
  trained within 8 GB (goal: 200), with round time and peak memory per size.
- `bytes_per_round_ratio`: the array bytes one site received and sent per round in the
  same simulation (`bytes-sent` + `bytes-received` rows, counted from the ArrayRecords the
  apps built, not from a network trace; the median over the rounds before the last) over
  2 x the model's parameter bytes (one model down, one update up); also with the update
  sent in 16 bits (run config `update-dtype`), and with 16 bits both ways
  (`bytes_per_round_ratio_16bit`: `update-dtype` and `model-dtype` float16; goal 0.55).

Timing is noisy on a shared machine: a figure here is a measurement, never a test.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from rich.console import Console

from client.local import Budget, DPSettings, RoundPlan, make_private, open_ledger
from client.privacy import LedgerStore
from server.ops.deploy import DeployConfig, deploy_local
from server.ops.processes import PROMPT_ENV
from server.results import FEDERATION, RESULTS_FILE, TRAIN, read_rows
from server.strategy import BYTES_RECEIVED, BYTES_SENT, ROUND_SECONDS
from shared_model.batch import Batch
from shared_model.config import DEFAULT_LABELS, ModelConfig
from shared_model.contract import pulls, wire
from shared_model.dataset import open_site
from shared_model.files import atomic_write_text
from shared_model.model import MedFuseModel, freeze
from shared_model.tokenizer import Tokenizer
from shared_model.tooling.figures import pyplot, save_png
from shared_model.tooling.synth import SynthConfig, write_federation
from shared_model.train import make_loss_fn
from simulations.config import load_config
from simulations.runner import Runner

# Flower 1.42's SuperNode waits this long before it looks for a new message again when it
# found none (`flwr/supernode/start_client_internal.py`, `start_client_internal`: a fixed
# `time.sleep(3)`, no flag or environment variable sets it): a deployed round pays most of
# it, since the next round's message is never there the moment a node has replied.
SUPERNODE_POLL_S = 3.0

GOALS = {"dp_step_ratio": ("<=", 1.6), "bytes_per_round_ratio": ("<=", 1.05),
         "bytes_per_round_ratio_16bit": ("<=", 0.55),
         "deploy_round_overhead_s": ("<=", 4.0),
         "sim_round_overhead": ("<=", 1.10), "hospitals_max": (">=", 200),
         "hospitals_all_train": (">=", 200)}


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


def _bench_site(image_size: int, cases: int, workdir: Path):
    cfg = ModelConfig.small(image_size=image_size)
    (site_dir,) = write_federation(workdir / "bench-site", SynthConfig(
        sites=1, cases_per_site=cases, seed=3, image_size=image_size), overwrite=True)
    return cfg, open_site(site_dir, labels=DEFAULT_LABELS, model=cfg,
                          tokenizer=Tokenizer(cfg.vocab_size))


def dp_step_figures(image_size: int = 64, batch: int = 32, repeats: int = 10,
                    workdir: Path = Path("bench-data")) -> list[Figure]:
    """DP-SGD step time over plain step time, for all layers and for fewer: the
    product's default per-example gradients (`make_private`'s "fast",
    `shared_model.grad_samplers`), and with all layers also Opacus' hooks
    (`dp_step_ratio_hooks`). The steps alternate within each repeat (plain, DP, ...), so
    that a load that comes and goes on a shared machine falls on both alike."""
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

    def dp_step(layers: str, mode: str) -> Callable[[], object]:
        model = MedFuseModel(cfg).train()
        freeze(model, layers)  # type: ignore[arg-type]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        n = len(site.train)
        plan = RoundPlan(released_n=n, noise_multiplier=1.0, sample_rate=batch / n,
                         steps=1, epsilon_after=math.inf)
        store = LedgerStore(workdir / "bench-ledger")
        with store.lock():  # an empty ledger: make_private starts its accountant from it
            ledger = open_ledger(store, site, Budget(epsilon=1e9, delta=1e-5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, dp_opt, _, _ = make_private(model, opt, site.train, plan, DPSettings(),
                                             ledger, torch.device("cpu"),
                                             per_example_gradients=mode)  # type: ignore[arg-type]

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
        steps = {"plain": plain_step(layers), "fast": dp_step(layers, "fast")}
        if layers == "all":
            steps["hooks"] = dp_step(layers, "hooks")
        times = _interleaved_medians(steps, repeats)
        plain = times["plain"]
        key = "dp_step_ratio" if layers == "all" else f"dp_step_ratio_{layers.replace('-', '_')}"
        settings = {"model": "small", "image_size": image_size, "batch": batch,
                    "layers": layers, "repeats": repeats, "threads": torch.get_num_threads(),
                    "plain_step_s": round(plain, 4)}
        figures.append(Figure(key, times["fast"] / plain, {
            **settings, "dp_step_s": round(times["fast"], 4), "grad_sample_mode": "fast"}))
        if "hooks" in times:
            figures.append(Figure(f"{key}_hooks", times["hooks"] / plain, {
                **settings, "dp_step_s": round(times["hooks"], 4),
                "grad_sample_mode": "hooks"}))
    return figures


def _interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int,
                         warmup: int = 2) -> dict[str, float]:
    """Each step's median seconds, the steps run in turn within every repeat."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def parameter_bytes(image_size: int = 64) -> dict[str, int]:
    """The model's bytes: its state dict as sent, and its parameters, each stored tensor
    once."""
    model = MedFuseModel(ModelConfig.small(image_size=image_size))
    seen: set[int] = set()
    params = 0
    for p in model.parameters():  # each stored tensor once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            params += p.numel() * p.element_size()
    return {"state_dict_bytes": sum(t.numel() * t.element_size()
                                    for t in model.state_dict().values()),
            "parameter_bytes": params, "state_dict_keys": len(model.state_dict()),
            "parameters": sum(p.numel() for p in model.parameters())}


def round_bytes(rows) -> list[float]:  # type: ignore[no-untyped-def]
    """Array bytes one site received and sent per round (all phases; the mean over the
    sites), for every round but the last, which also carries the final evaluation."""
    last = max((r.round for r in rows), default=0)
    out = []
    for rnd in range(1, last):
        per_site: dict[str, float] = {}
        for r in rows:
            if r.round == rnd and r.metric in (BYTES_SENT, BYTES_RECEIVED):
                per_site[r.site] = per_site.get(r.site, 0.0) + r.value
        if per_site:
            out.append(statistics.fmean(per_site.values()))
    return out


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
"""
# the experiments of the simulated-round figures: name -> run config beside FedAvg + DP
SIM_RUNS = {
    "fedavg-dp": "{}",
    "fedavg-dp-secagg": "{ secure-aggregation = true }",
    "fedavg-dp-fp16": '{ update-dtype = "float16" }',
    "fedavg-dp-fp16-both": '{ update-dtype = "float16", model-dtype = "float16" }',
}
UPDATE_ONLY_RUN = "fedavg-dp-fp16"  # 16-bit updates, 32-bit model: left out of the quick bench


def sim_config(sites: int, cases: int, image_size: int, rounds: int,
               runs: tuple[str, ...]) -> str:
    """The simulated-round bench's config with the experiments `runs` of SIM_RUNS."""
    experiments = "".join(
        f'[[experiment]]\nname = "{name}"\nkind = "federated"\ndp = true\nepsilon = 8.0\n'
        f"run-config = {SIM_RUNS[name]}\n" for name in runs)
    return SIM_CONFIG.format(sites=sites, cases=cases, image_size=image_size,
                             rounds=rounds) + experiments


def sim_round_figures(out: Path, *, sites: int = 2, cases: int = 60, image_size: int = 32,
                      rounds: int = 4, update_only: bool = True) -> list[Figure]:
    """A small simulation through Flower's engine: each round's wall time at the server
    over the slowest hospital's own compute that round; what SecAgg+ adds to a round; the
    array bytes per site and round, as sent, in float32, with 16-bit updates and 32-bit
    model (`update_only`) and 16 bits both ways."""
    names = tuple(n for n in SIM_RUNS if update_only or n != UPDATE_ONLY_RUN)
    cfg_file = out / "sim.toml"
    cfg_file.write_text(sim_config(sites, cases, image_size, rounds, names), encoding="utf-8")
    cfg = load_config(cfg_file, out=out / "sim")
    Runner(cfg, console=Console(quiet=True), progress=False).run()
    runs = out / "sim" / "experiments"
    rows = {name: read_rows(runs / name / "seed-0" / "results.jsonl") for name in names}
    plain = round_overheads(rows["fedavg-dp"])
    secure = round_overheads(rows["fedavg-dp-secagg"])
    ratios = [wall / compute for wall, compute in plain]
    # the first round pays for starting the ClientApps (imports, the first decode); the
    # last one also sends the final model's evaluate message
    steady = ratios[1:-1] or ratios
    extra = [s[0] - p[0] for p, s in zip(plain, secure, strict=False)]
    settings = {"hospitals": sites, "cases_per_site": cases, "image_size": image_size,
                "rounds": rounds}
    model = parameter_bytes(image_size)
    two_models = 2 * model["parameter_bytes"]
    sent = {name: round_bytes(rows[name]) for name in names if name != "fedavg-dp-secagg"}
    update16 = [] if UPDATE_ONLY_RUN not in sent else [Figure(
        "bytes_per_round_ratio_16bit_update", statistics.median(sent[UPDATE_ONLY_RUN])
        / two_models, {**settings, **model, "update_dtype": "float16",
                       "bytes_per_site_and_round": sent[UPDATE_ONLY_RUN]})]
    return [
        Figure("sim_round_overhead", statistics.median(steady), {
            **settings, "round_wall_s": [round(w, 2) for w, _ in plain],
            "slowest_site_compute_s": [round(c, 2) for _, c in plain],
            # what the ratio hides when a change speeds up the sites' own work too
            "round_extra_s": [round(w - c, 2) for w, c in plain],
            "first_round_ratio": round(ratios[0], 3) if ratios else None,
            "last_round_ratio": round(ratios[-1], 3) if ratios else None}),
        Figure("secagg_round_extra_s", statistics.median(extra[1:] or extra), {
            **settings, "secure_round_wall_s": [round(w, 2) for w, _ in secure],
            "plain_round_wall_s": [round(w, 2) for w, _ in plain]}),
        Figure("bytes_per_round_ratio", statistics.median(sent["fedavg-dp"]) / two_models, {
            **settings, **model, "bytes_per_site_and_round": sent["fedavg-dp"]}),
        *update16,
        Figure("bytes_per_round_ratio_16bit",
               statistics.median(sent["fedavg-dp-fp16-both"]) / two_models, {
                   **settings, **model, "update_dtype": "float16", "model_dtype": "float16",
                   "bytes_per_site_and_round": sent["fedavg-dp-fp16-both"]}),
    ]


def round_overheads(rows) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    """(round wall time at the server, slowest hospital's own compute) per round of a
    ServerApp's results rows."""
    out = []
    for rnd in sorted({r.round for r in rows}):
        wall = [r.value for r in rows if r.round == rnd and r.site == FEDERATION
                and r.metric == ROUND_SECONDS]
        own: dict[str, float] = {}
        for r in rows:
            if r.round == rnd and r.metric == wire.M_SECONDS and r.site != FEDERATION:
                own[r.site] = own.get(r.site, 0.0) + r.value
        if wall and own:
            out.append((wall[0], max(own.values())))
    return out


def _clientapp_start_s() -> float:
    """Wall seconds of a fresh Python importing the ClientApp (what each message costs a
    deployed node before any work: Flower starts one process per message)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import client.app"], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def deploy_figures(out: Path, rounds: int = 5, *, warm: bool = True) -> list[Figure]:
    """`medfuse deploy local` with 2 hospitals: the seconds each round takes beyond the
    slowest hospital's own compute. `warm`: the SuperNodes run `--isolation process`
    with medfuse's warm SuperExec (ClientApp processes forked from one that imported
    torch already, `client/warm_exec.py`); else Flower's own, a fresh process a message."""
    cfg = DeployConfig(hospitals=2, rounds=rounds, out=out / ("deploy" if warm else "deploy-cold"),
                       min_nodes=2, public=False, run_config={"batch-size": 16},
                       timed_nodes=True, warm_clientapps=warm)
    outcome = deploy_local(cfg, echo=lambda line: None)
    times = round_overheads(read_rows(outcome.output_dir / RESULTS_FILE))
    extra = [wall - own for wall, own in times]
    start = statistics.median(_clientapp_start_s() for _ in range(3))
    # rounds after the first and before the last: one train message each (the last also
    # sends the final model's evaluate message)
    key = "deploy_round_overhead_s" if warm else "deploy_round_overhead_s_cold_clientapps"
    return [Figure(key, statistics.median(extra[1:-1] or extra), {
        "hospitals": 2, "cases_per_site": cfg.cases_per_site, "image_size": cfg.image_size,
        "rounds": rounds, "round_wall_s": [round(w, 2) for w, _ in times],
        "slowest_site_compute_s": [round(c, 2) for _, c in times],
        "messages_per_round": 1, "last_round_extra_s": round(extra[-1], 2) if extra else None,
        "clientapps": ("warm: forked by client/warm_exec.py (--isolation process)" if warm
                       else "Flower's: a new flwr-clientapp process per message"),
        "cold_clientapp_start_s": round(start, 2),
        "superexec_poll_s": float(PROMPT_ENV["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]),
        "supernode_poll_s": SUPERNODE_POLL_S, "object_pull_first_wait_s": pulls.FIRST_WAIT_S})]


SCALE_CONFIG = """
name = "bench: {n} hospitals"
seeds = [0]
[sites]
source = "synthetic"
count = {n}
cases-per-site = 20
seed = 0
[model]
image-size = 32
[training]
rounds = 1
[resources]
client-cpus = 1
[[experiment]]
name = "fedavg"
kind = "federated"
dp = true
epsilon = 8.0
run-config = {{ fraction-train = {frac}, fraction-evaluate = {frac} }}
"""


class _PeakMemory:
    """The peak memory of this process and all its descendants (Flower's SuperLink, Ray's
    workers, the ServerApp), sampled twice a second: the sum of resident sizes (`peak`,
    which counts a page shared by several processes, such as torch's libraries, once in
    each) and, where the system tells it (Linux), the sum of proportional set sizes
    (`peak_pss`: each shared page split among its sharers, so the sum is the memory the
    tree really holds)."""

    def __init__(self) -> None:
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _sizes(proc: psutil.Process) -> tuple[int, int]:
        """(rss, pss) of one process; pss 0 where the system does not give it."""
        try:
            full = proc.memory_full_info()
            return full.rss, int(getattr(full, "pss", 0))
        except psutil.AccessDenied:
            return proc.memory_info().rss, 0

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    r, p = self._sizes(proc)
                except psutil.Error:
                    continue
                rss, pss = rss + r, pss + p
            self.peak = max(self.peak, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(0.5)

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def scale_point(out: Path, n: int, frac: float, tag: str = "scale") -> dict[str, object]:
    """One simulated federation of `n` 20-case hospitals (32 px, one DP round in which a
    fraction `frac` of them train and evaluate): peak memory of the whole process tree,
    the round's time at the server and the whole run's."""
    cfg_file = out / f"{tag}-{n}.toml"
    cfg_file.write_text(SCALE_CONFIG.format(n=n, frac=frac), encoding="utf-8")
    cfg = load_config(cfg_file, out=out / f"{tag}-{n}")
    t0 = time.perf_counter()
    with _PeakMemory() as mem:
        outcome = Runner(cfg, console=Console(quiet=True), progress=False).run()
    rows = read_rows(out / f"{tag}-{n}" / "experiments" / "fedavg" / "seed-0"
                     / "results.jsonl") if not outcome.failed else []
    round_s = next((r.value for r in rows if r.site == FEDERATION
                    and r.metric == ROUND_SECONDS), math.nan)
    trained = len({r.site for r in rows if r.metric == wire.M_NUM_EXAMPLES
                   and r.phase == TRAIN and r.value > 0})
    return {"hospitals": n, "trained": trained, "peak_gb": mem.peak / 1e9,
            "peak_pss_gb": mem.peak_pss / 1e9, "round_s": round_s,
            "total_s": time.perf_counter() - t0, "failed": bool(outcome.failed)}


def _rounded(points: list[dict]) -> list[dict]:
    return [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()}
            for p in points]


def hospitals_figures(out: Path, counts: tuple[int, ...] = (10, 50, 100, 200),
                      sampled: int = 4) -> list[Figure]:
    """Simulated federations of growing size (20-case hospitals, 32 px, one DP round in
    which `sampled` hospitals train and evaluate): peak memory of the whole process tree
    and round time, and a plot of both against the number of hospitals."""
    points = [scale_point(out, n, min(1.0, sampled / n)) for n in counts]
    _scale_plot(points, out / "bench-hospitals.png")
    ok = [p for p in points if not p["failed"]]
    top = max(ok, key=lambda p: p["hospitals"]) if ok else None
    return [Figure("hospitals_max", float(top["hospitals"]) if top else 0.0, {
        "points": _rounded(points),
        "sampled_per_round": sampled, "cases_per_site": 20, "image_size": 32,
        "peak_gb_at_max": round(top["peak_gb"], 3) if top else None,
        "plot": str(out / "bench-hospitals.png")})]


def hospitals_all_train_figures(out: Path, counts: tuple[int, ...] = (10, 50, 100, 200),
                                limit_gb: float = 8.0) -> list[Figure]:
    """The same federations with every hospital sampled (fraction 1.0): each trains and
    evaluates in the round. The figure is the largest that ran with all of them trained
    within `limit_gb` of peak memory; round time and memory of each size beside it. A
    size past the limit ends the series: the larger ones would only take more of a
    machine that may be shared (their sizes are listed as not run)."""
    points: list[dict] = []
    for n in counts:
        points.append(scale_point(out, n, 1.0, tag="all-train"))
        if points[-1]["peak_gb"] > limit_gb:
            break
    not_run = [n for n in counts if n not in {p["hospitals"] for p in points}]
    _scale_plot(points, out / "bench-hospitals-all-train.png")
    ok = [p for p in points if not p["failed"] and p["trained"] == p["hospitals"]
          and p["peak_gb"] <= limit_gb]
    top = max(ok, key=lambda p: p["hospitals"]) if ok else None
    return [Figure("hospitals_all_train", float(top["hospitals"]) if top else 0.0, {
        "points": _rounded(points), "not_run_past_limit": not_run, "fraction_train": 1.0,
        "cases_per_site": 20, "image_size": 32, "limit_gb": limit_gb,
        "peak_gb_at_max": round(top["peak_gb"], 3) if top else None,
        "round_s_at_max": round(top["round_s"], 2) if top else None,
        "plot": str(out / "bench-hospitals-all-train.png")})]


def _scale_plot(points: list[dict], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    xs = [p["hospitals"] for p in points]
    ax.plot(xs, [p["peak_gb"] for p in points], "o-", label="peak memory (GB)")
    ax.set_xlabel("simulated hospitals")
    ax.set_ylabel("peak memory of the process tree (GB)")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["round_s"] for p in points], "s--", color="C1", label="round time (s)")
    ax2.set_ylabel("round time (s)")
    fig.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def run_bench(out: Path, *, quick: bool = False, image_size: int = 64,
              echo: Callable[[str], object] = print) -> list[Figure]:
    """Every figure, printed as it is measured, then bench.json under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    figures: list[Figure] = []
    steps: list[Callable[[], list[Figure]]] = [
        lambda: dp_step_figures(image_size=image_size, repeats=3 if quick else 10,
                                workdir=out / "data"),
        lambda: sim_round_figures(out, image_size=image_size, rounds=3 if quick else 5,
                                  update_only=not quick),
        # a real deployment takes minutes: the full bench only
        *([] if quick else [lambda: deploy_figures(out)]),
        # quick: one size each (8 with 4 sampled, 4 all training): the suite's time
        lambda: hospitals_figures(out, counts=(8,) if quick else (10, 50, 100, 200)),
        lambda: hospitals_all_train_figures(out, counts=(4,) if quick else (10, 50, 100, 200)),
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
