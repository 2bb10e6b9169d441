"""The DP levers of the field, measured quickly: FedAvg + DP in one process, no Flower.

    python -m simulations.dp_levers NAME sites=DIR public=MODEL.pt [key=value ...]

Each hospital's round is the product's own `client.local.private_round` (the ledger,
the noise plan, Opacus), so the privacy and the recipe are the ClientApp's; only the
transport is left out, which is what makes a lever's A/B take minutes instead of a
simulation's quarter hour. Keys (defaults in brackets): rounds [8], epochs [1] per round,
lr [0.05], layers [all], sched [constant|cosine], bs [32], augmult [1], eps [8],
momentum [0] and slr [1] (the server's step along the mean, FedAvgM), ema [0] (the final
model an average of the rounds'), reserve [0] (epsilon kept for personalisation, spent
with `client.local.PERSONALISE` or players/plr/pepochs; pvariants=LAYERS:LR:EPOCHS,...
each also tried from copies of the ledgers), mode [fed|local] (local: each
hospital alone for rounds x epochs from the public model). Prints one JSON line (mean
test accuracy over hospitals, per hospital, the round curve) and appends it to
`out/levers.jsonl` (out [runs/dp-levers]); each NAME keeps its own ledgers under out,
so a NAME already used is refused rather than charged twice.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from client.local import (
    Budget,
    DPSettings,
    LocalSteps,
    local_evaluate,
    personal_steps,
    private_round,
)
from client.privacy import LedgerStore
from shared_model.dataset import SiteData, open_site
from shared_model.model_file import load_model_file
from shared_model.tokenizer import Tokenizer

CPU = torch.device("cpu")
State = dict[str, torch.Tensor]


def _accuracy(cfg, sites: list[SiteData], state: State) -> list[float]:
    return [local_evaluate(cfg, s, state, CPU, "test")[0]["accuracy"] for s in sites]


def _steps(a: dict[str, str], rnd: int, rounds: int, epochs: int) -> LocalSteps:
    lr = float(a.get("lr", 0.05))
    if a.get("sched") == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * (rnd - 1) / rounds))
    return LocalSteps(epochs=epochs, lr=lr, batch_size=int(a.get("bs", 32)), optimizer="sgd",
                      train_layers=a.get("layers", "all"),  # type: ignore[arg-type]
                      augmult=int(a.get("augmult", 1)))


def _server_step(g: State, outs, mom: State, ema: State, a: dict[str, str]) -> None:
    """FedAvg's weighted mean, then FedAvgM's step and the EMA (in place)."""
    n = sum(o.num_examples for o in outs)
    beta, slr = float(a.get("momentum", 0)), float(a.get("slr", 1))
    decay = float(a.get("ema", 0))
    for k in g:
        mean = sum(o.state[k].float() * o.num_examples for o in outs) / n
        mom[k] = beta * mom[k] + (mean - g[k])
        g[k] = g[k] + slr * mom[k]
        ema[k] = decay * ema[k] + (1 - decay) * g[k] if decay else g[k].clone()


def _personalise(cfg, sites: list[SiteData], stores: dict[str, LedgerStore], g: State,
                 steps: LocalSteps, budget: Budget) -> list[float]:
    """Each hospital's test accuracy after spending its reserve on `steps` from `g`."""
    mine = [private_round(stores[s.name], cfg, s, g, steps, budget, device=CPU)
            for s in sites]
    return [math.nan if o.state is None else _accuracy(cfg, [s], o.state)[0]
            for s, o in zip(sites, mine, strict=True)]


def _variant(spec: str) -> LocalSteps:
    """`layers:lr:epochs` -> the personalisation steps it names."""
    layers, lr, epochs = spec.split(":")
    return personal_steps(int(epochs), float(lr), layers)


def _copied(stores: dict[str, LedgerStore], to: Path) -> dict[str, LedgerStore]:
    """Copies of the ledger stores under `to`: each personalisation variant spends the
    same reserve, once, from ledgers of its own."""
    for name, store in stores.items():
        shutil.copytree(store.root, to / name)
    return {name: LedgerStore(to / name) for name in stores}


def run(name: str, a: dict[str, str]) -> dict[str, object]:
    out = Path(a.get("out", "runs/dp-levers"))
    if (out / name).exists():
        raise SystemExit(f"{out / name} exists: give the run another name")
    mf = load_model_file(Path(a["public"]))
    cfg, tok = mf.model_config, Tokenizer(mf.model_config.vocab_size)
    sites = [open_site(d, labels=mf.labels, model=cfg, tokenizer=tok)
             for d in sorted(Path(a["sites"]).glob("site-*"))]
    stores = {s.name: LedgerStore(out / name / s.name) for s in sites}
    rounds, epochs = int(a.get("rounds", 8)), int(a.get("epochs", 1))
    eps, reserve = float(a.get("eps", 8)), float(a.get("reserve", 0))
    budget, t0 = Budget(epsilon=eps, delta=1e-5), time.time()
    result: dict[str, object] = {"name": name, "args": a}
    if a.get("mode") == "local":
        states = [private_round(stores[s.name], cfg, s, mf.state,
                                _steps(a, 1, 1, rounds * epochs), budget, device=CPU,
                                run_id=1).state for s in sites]
        per_site = [_accuracy(cfg, [s], st)[0] for s, st in zip(sites, states, strict=True)]
    else:
        g = {k: v.clone().float() for k, v in mf.state.items()}
        mom, ema = {k: torch.zeros_like(v) for k, v in g.items()}, dict(g)
        curve = []
        for r in range(1, rounds + 1):
            outs = [private_round(stores[s.name], cfg, s, g, _steps(a, r, rounds, epochs),
                                  budget, device=CPU, dp=DPSettings(reserve=reserve),
                                  run_id=1, server_round=r, rounds_left=rounds - r + 1)
                    for s in sites]
            _server_step(g, outs, mom, ema, a)
            curve.append(sum(acc := _accuracy(cfg, sites, ema)) / len(acc))
            print(name, r, f"{curve[-1]:.3f}", flush=True)
        result["curve"] = curve
        per_site = _accuracy(cfg, sites, ema)
        if reserve:
            steps = personal_steps(int(a["pepochs"]) if "pepochs" in a else None,
                                   float(a["plr"]) if "plr" in a else None, a.get("players"))
            result["personalised"] = _personalise(cfg, sites, stores, ema, steps, budget)
            result["variants"] = {
                spec: _personalise(cfg, sites, _copied(stores, out / name / f"p{i}"), ema,
                                   _variant(spec), budget)
                for i, spec in enumerate(filter(None, a.get("pvariants", "").split(",")))}
    result["per_site"] = per_site
    result["mean"] = sum(per_site) / len(per_site)
    result["seconds"] = round(time.time() - t0)
    with (out / "levers.jsonl").open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run(sys.argv[1], dict(kv.split("=", 1) for kv in sys.argv[2:]))))
