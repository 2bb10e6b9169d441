"""Which data this node trains on, where its privacy ledgers live, what it accepts (no Flower).

Deployment: the SuperNode's `--node-config` names the hospital's site folder
(`data-path`) and optionally `site-name`, `device`, budgets, `state-dir`, `threads` and
the node's policy (`allow-non-private`, `evaluation`, limits on what a round may ask and
on the secure-aggregation protocol). The hospital decides these; the run config can lower
a budget, never raise it, and cannot change the policy. A node that says nothing about
its training budget has one all the same (`epsilon-budget`, default 8): a budget the run
config set would be the coordinator's choice, and the coordinator could ask for any.

Simulation: Flower gives only `partition-id` and `num-partitions`; the partition picks
the N-th site folder under the run config's `sites-dir`, or of a synthetic federation
written on first use into a cache folder. A simulated hospital belongs to the researcher
who runs the simulation, so the run config's `sim-node-config` plays the part of its
node config (a deployed node, one with `data-path`, never reads it), and its training
budget, unless `sim-node-config` names one, is the run's `epsilon`: the researcher
writes both sides, so there is no one else's budget to protect.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from client.privacy import default_store_root
from shared_model.config import MANIFEST, cache_root
from shared_model.contract import wire
from shared_model.contract.run_config import DEFAULT_NODE_EPSILON_BUDGET, RunConfig, device_name
from shared_model.contract.validation import describe, messages
from shared_model.dataset import SiteData, SiteError, open_site
from shared_model.tokenizer import Tokenizer
from shared_model.tooling import synth
from shared_model.train import pick_device

log = logging.getLogger(__name__)



class SiteConfigError(ValueError):
    """This node cannot tell which data to use; the message says what to fix."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


EvaluationRelease = Literal["dp", "exact", "off"]

DEFAULT_EPSILON_BUDGET = DEFAULT_NODE_EPSILON_BUDGET  # the hospital's own, never the run's
# the budget of a data's val/test splits (node config eval-epsilon-budget): every ledger
# client/ opens takes this default unless the node names its own
DEFAULT_EVAL_EPSILON_BUDGET = 2.0


class NodeConfig(BaseModel):
    """The SuperNode's `--node-config`, typed. Every key is optional; unknown keys fail.

    The defaults are the safe choice: DP only, a training budget of the node's own,
    private evaluation metrics, a few evaluations per run, bounds on what the server may
    ask of a round, and SecAgg+ only with a majority threshold. No float may be inf or NaN
    (`allow_inf_nan`): an infinite budget is spelled `allow-non-private`, not a number."""

    # kebab-case keys only, as the SuperNode's --node-config spells them
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=_kebab,
                              allow_inf_nan=False)

    # deployment
    data_path: str | None = Field(None, description="the hospital's site folder (format v1)")
    site_name: str | None = Field(None, min_length=1, description="default: the folder name")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    epsilon_budget: float = Field(
        DEFAULT_EPSILON_BUDGET, gt=0.0, description="this node's training budget: a run "
        "config's epsilon may lower it for its run, never raise it")
    epsilon_reserve: float = Field(
        0.0, ge=0.0, description="training epsilon federated rounds may "
        "not spend: kept for this hospital's own later releases (medfuse personalise)")
    delta: float | None = Field(None, gt=0.0, lt=1.0, description="only lower than the run's")
    state_dir: str | None = Field(None, description="the ledger store (default ~/.medfuse/privacy)")
    node_key: str | None = Field(
        None, min_length=1, description="the SuperNode's private key file: the ledger's "
        "and the audit log's chains are keyed by a secret derived from it, which then "
        "never sits in the store's folder (default: STATE_DIR/chain.key)")
    threads: int = Field(1, ge=1, le=1024, description="torch threads of this ClientApp")
    # what this hospital releases
    allow_non_private: bool = Field(False, description="train when the run asks dp=false")
    release_compute_time: bool = Field(
        False, description="send the seconds each message took, released WITHOUT DP (a "
        "crafted model can make its running time depend on one case): for a researcher's "
        "simulated hospitals and benchmarks, never a hospital's default")
    evaluation: EvaluationRelease = Field(
        "dp", description="dp: noised metrics charged to the evaluation budget; exact: "
        "exact metrics, recorded as infinite epsilon; off: no evaluation metrics")
    eval_epsilon_budget: float = Field(DEFAULT_EVAL_EPSILON_BUDGET, gt=0.0,
                                       description="budget of the val/test splits")
    max_evaluations_per_run: int = Field(4, ge=0, le=10_000)
    # what a round may ask of this node
    min_lr: float = Field(1e-6, gt=0.0)
    max_lr: float = Field(1.0, gt=0.0)
    max_local_epochs: int = Field(10, ge=1)
    max_batch_size: int = Field(1024, ge=1)
    max_proximal_mu: float = Field(10.0, ge=0.0)
    # what this node accepts of the secure-aggregation protocol (SecAgg+, `client.secure`)
    secagg_min_shares: int = Field(
        2, ge=2, le=10_000, description="the fewest parts a round may split this node's "
        "mask keys into (2: one part alone is the key itself, which the node sends back "
        "in the last stage)")
    secagg_min_threshold: float = Field(
        0.5, ge=0.5, lt=1.0, description="a round's threshold must be strictly more than "
        "this share of the parts (0.5: a majority, which SecAgg+ needs against a coordinator "
        "that asks some nodes for a live node's mask seed and others for its key)")
    # simulation (set by Flower)
    partition_id: int | None = Field(None, ge=0)
    num_partitions: int | None = Field(None, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return device_name(value)


@dataclass(frozen=True)
class RoundAsk:
    """What the server asks of one training round (round config and run config)."""

    lr: float
    local_epochs: int
    batch_size: int
    proximal_mu: float


def round_refusal(node: NodeConfig, ask: RoundAsk) -> str:
    """'' when the node accepts the round, else why not (for the reply and the log)."""
    problems = []
    if not node.min_lr <= ask.lr <= node.max_lr:
        problems.append(f"lr={ask.lr:g} outside [{node.min_lr:g}, {node.max_lr:g}]")
    if not 1 <= ask.local_epochs <= node.max_local_epochs:
        problems.append(f"local-epochs={ask.local_epochs} outside [1, {node.max_local_epochs}]")
    if not 1 <= ask.batch_size <= node.max_batch_size:
        problems.append(f"batch-size={ask.batch_size} outside [1, {node.max_batch_size}]")
    if not 0.0 <= ask.proximal_mu <= node.max_proximal_mu:
        problems.append(f"proximal-mu={ask.proximal_mu:g} outside [0, {node.max_proximal_mu:g}]")
    if not problems:
        return ""
    return ("this node does not accept the round: " + "; ".join(problems)
            + " (limits are the node config's min-lr, max-lr, max-local-epochs, "
              "max-batch-size, max-proximal-mu)")


@dataclass(frozen=True)
class SiteChoice:
    """Everything this node decided about itself before opening any data."""

    data_path: Path  # absolute site folder
    site_name: str
    device: str  # auto, cpu, cuda, cuda:N
    epsilon_budget: float  # the node's own cap, already lowered to the run's epsilon
    delta: float | None  # the node's own cap; None = the federation's
    state_dir: Path  # the ledger store of this node install
    threads: int
    simulation: bool
    node: NodeConfig  # the whole node config: policy and limits
    partition_id: int | None = None


def sim_node_config(text: str) -> dict[str, object]:
    """The run config's `sim-node-config`: the body of a TOML inline table,
    e.g. "allow-non-private=true, evaluation='exact', state-dir='/tmp/ledgers'"."""
    if not text.strip():
        return {}
    try:
        values = tomllib.loads(f"x = {{{text}}}")["x"]
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError(f"run config sim-node-config={text!r} is not a TOML inline "
                              f"table body ({exc})") from None
    for key in ("data-path", "partition-id", "num-partitions"):
        if key in values:
            raise SiteConfigError(f"sim-node-config may not set {key}")
    return dict(values)


def sim_node_config_text(values: Mapping[str, object]) -> str:
    """The inverse of `sim_node_config`: a dict as the body of a TOML inline table."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))  # a JSON string is a TOML basic string

    return ", ".join(f"{k}={value(v)}" for k, v in values.items())


def parse_node_config(node_config: Mapping[str, object]) -> NodeConfig:
    try:
        return NodeConfig.model_validate(dict(node_config))
    except ValidationError as exc:
        raise SiteConfigError(describe(exc, "node config")) from None


def node_settings(node_config: Mapping[str, object], run: RunConfig) -> NodeConfig:
    """This node's own settings, read without opening any data: a deployed node's node
    config; a simulated node's is the researcher's `sim-node-config` under Flower's keys,
    with the run's epsilon as its training budget unless it names one."""
    node = parse_node_config(node_config)
    if node.data_path is not None or node.partition_id is None:
        return node
    return parse_node_config({"epsilon-budget": run.epsilon,
                              **sim_node_config(run.sim_node_config), **dict(node_config)})


def training_cap(node: NodeConfig, run: RunConfig) -> float:
    """The most this node's training may spend in this run: its own budget, lowered by the
    run's epsilon, never raised by it."""
    return min(node.epsilon_budget, run.epsilon)


def resolve_site(node_config: Mapping[str, object], run: RunConfig) -> SiteChoice:
    """Pick this node's site folder, name, device, budget caps, ledger folder and threads."""
    node = node_settings(node_config, run)
    if node.data_path is not None:
        return _deployment(node, run)
    if node.partition_id is not None:
        return _simulation(node, run)
    raise SiteConfigError(
        "this node has no data: start the SuperNode with "
        "--node-config \"data-path='/path/to/site'\" (a site folder holding manifest.csv)"
    )


def _deployment(node: NodeConfig, run: RunConfig) -> SiteChoice:
    assert node.data_path is not None
    if not node.data_path.strip():
        raise SiteConfigError("node config data-path is empty: give the site folder")
    data = Path(node.data_path).expanduser().resolve()
    if not data.is_dir():
        raise SiteConfigError(f"node config data-path={node.data_path!r}: no such folder")
    if not (data / MANIFEST).is_file():
        raise SiteConfigError(f"node config data-path={node.data_path!r}: no {MANIFEST} in it")
    name = node.site_name or data.name
    return SiteChoice(
        data_path=data, site_name=name, device=node.device,
        epsilon_budget=training_cap(node, run), delta=node.delta, state_dir=_store(node),
        threads=node.threads, simulation=False,
        node=node,
    )


def _store(node: NodeConfig) -> Path:
    """One ledger store per node install: its `state-dir`, else the default store."""
    if node.state_dir:
        return Path(node.state_dir).expanduser().resolve()
    return default_store_root()


def simulated_store(root: Path, data_path: Path) -> Path:
    """The ledger store of one simulated hospital: a folder of its own under the
    simulation's `state-dir`, named as its site folder. A simulated node stands for one
    hospital's install, which keeps a store of its own. One store shared by every
    simulated hospital made them train one at a time: a round holds its store's lock
    from the ledger's charge to its save (`client.local.private_round`), so each hospital
    waited for the others' rounds, and that wait was counted as its own compute."""
    return root / data_path.name


def _simulation(node: NodeConfig, run: RunConfig) -> SiteChoice:
    assert node.partition_id is not None
    root = Path(run.sites_dir).expanduser().resolve() if run.sites_dir else synthetic_sites(run)
    sites = list_sites(root)
    if not sites:
        raise SiteConfigError(f"sites-dir={run.sites_dir!r}: no site folders (with {MANIFEST})")
    if node.partition_id >= len(sites):
        raise SiteConfigError(
            f"partition-id={node.partition_id} but sites-dir={str(root)!r} holds only "
            f"{len(sites)} site folder(s): run with at most {len(sites)} nodes "
            "(num-supernodes) or add sites"
        )
    if node.num_partitions is not None and node.num_partitions != len(sites):
        log.info("%d simulated nodes, %d site folders in %s", node.num_partitions, len(sites),
                 root)
    data = sites[node.partition_id]
    name = node.site_name or data.name
    return SiteChoice(
        data_path=data, site_name=name, device=node.device,
        epsilon_budget=training_cap(node, run), delta=node.delta,
        state_dir=simulated_store(_store(node), data), threads=node.threads, simulation=True,
        node=node, partition_id=node.partition_id,
    )


def list_sites(root: Path) -> list[Path]:
    """Sub-folders of `root` that hold a manifest.csv, sorted by name (site-00, site-01...)."""
    if not root.is_dir():
        raise SiteConfigError(f"sites-dir {str(root)!r}: no such folder")
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


# ----------------------------------------------------------------- opened sites


class OpenedSites:
    """The sites this process has opened, newest last, at most `max_sites` of them.

    Why it exists: a simulation process serves many virtual nodes in turn, one message
    at a time, and decoding every image of a site on every message dominated a round. A
    site is opened again when anything that shapes it changes: its folder's files (name,
    size, modification time), the labels or the model settings.

    Why an object: the ClientApp creates one when it is built (`client.app.build_app`)
    and owns it for the life of the process, so a test (or a second app) makes its own,
    empty one.

    Pickled, it stays where it is: Flower's Ray backend ships the ClientApp, by value,
    with every message to a simulation actor, and a plain copy would arrive empty each
    time (every message decoded its site again) and would carry the sites the sender had
    opened. So a pickle holds only which OpenedSites it was (`_token`), and unpickling
    gives the receiving process's own one of that name (`_process_copy`): empty the first
    time, then whatever that process opened through it, for the life of the process.
    """

    def __init__(self, max_sites: int = 8) -> None:
        self.max_sites = max_sites
        self._sites: dict[tuple, SiteData] = {}  # insertion order: oldest first
        self._token = os.urandom(8).hex()  # which OpenedSites a pickled copy stands for

    def __reduce__(self) -> tuple:
        return (_process_copy, (self._token, self.max_sites))

    def open(self, path: Path, run: RunConfig) -> SiteData:
        """`open_site` of `path` under the run's labels and model, or the copy opened
        before from the same folder contents and settings."""
        model_cfg = run.model()
        key = (str(Path(path).resolve()), run.label_set, model_cfg.model_dump_json(),
               folder_stamp(Path(path)))
        site = self._sites.pop(key, None)
        if site is None:
            site = open_site(path, labels=run.label_set, model=model_cfg,
                             tokenizer=Tokenizer(model_cfg.vocab_size))
        self._sites[key] = site
        while len(self._sites) > self.max_sites:
            self._sites.pop(next(iter(self._sites)))
        return site


_PROCESS_COPIES: dict[str, OpenedSites] = {}  # unpickled OpenedSites, by token


def _process_copy(token: str, max_sites: int) -> OpenedSites:
    """This process's OpenedSites standing for the pickled one named `token` (made empty
    on first use; later unpickled copies are the same object)."""
    sites = _PROCESS_COPIES.get(token)
    if sites is None:
        sites = _PROCESS_COPIES[token] = OpenedSites(max_sites)
        sites._token = token
    return sites


class Unusable(Exception):
    """This node cannot take part in this message: `code` (`wire.SITE_ERRORS`) is what the
    server gets; `str()` is the full text, for the node's own log only."""

    def __init__(self, site_name: str, code: str, message: str) -> None:
        super().__init__(message)
        self.site_name = site_name
        self.code = code


def open_node_site(node_config: Mapping, run: RunConfig,
                   sites: OpenedSites) -> tuple[SiteChoice, SiteData, torch.device]:
    """What a message needs first: which data, which device, and the opened site (named
    as the node config says), through `sites`; `Unusable` with a code if not."""
    try:
        choice = resolve_site(node_config, run)
    except SiteConfigError as exc:
        raise Unusable(name_hint(node_config), wire.ERR_NODE_CONFIG, str(exc)) from None
    torch.set_num_threads(choice.threads)
    try:
        device = pick_device(choice.device)
    except (ValueError, RuntimeError) as exc:
        raise Unusable(choice.site_name, wire.ERR_DEVICE,
                       f"{choice.site_name}: {exc}") from None
    try:
        site = sites.open(choice.data_path, run)
    except (SiteError, OSError) as exc:
        raise Unusable(choice.site_name, wire.ERR_DATA_UNREADABLE,
                       f"{choice.site_name}: {exc}") from None
    if len(site.train) == 0:
        raise Unusable(choice.site_name, wire.ERR_NO_TRAINING_ROWS,
                       f"{choice.site_name}: no training rows")
    return choice, dataclasses.replace(site, name=choice.site_name), device


def name_hint(node_config: Mapping) -> str:
    """A name for a node whose config could not be used (for the server's log)."""
    if node_config.get("site-name"):
        return str(node_config["site-name"])
    if node_config.get("data-path"):
        return Path(str(node_config["data-path"])).name or str(node_config["data-path"])
    if "partition-id" in node_config:
        return f"partition-{node_config['partition-id']}"
    return "unknown-site"


def folder_stamp(folder: Path) -> tuple:
    """Every file's name, size and modification time: a changed folder, a new stamp."""
    stamp = []
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            stamp.append((os.path.relpath(os.path.join(root, name), folder), st.st_size,
                          st.st_mtime_ns))
    return tuple(sorted(stamp))


# ----------------------------------------------------------------- synthetic federation


def synthetic_name(run: RunConfig) -> str:
    """A cache folder name that changes whenever anything that shapes the data does."""
    labels = hashlib.sha256(",".join(run.label_set).encode()).hexdigest()[:8]
    return (
        f"sites{run.synth_sites}-cases{run.synth_cases_per_site}"
        f"-skew{run.synth_label_skew:g}-seed{run.seed}-px{run.image_size}-labels{labels}"
    )


def synthetic_root() -> Path:
    return cache_root() / "synthetic"


def synthetic_sites(run: RunConfig, cache: Path | None = None) -> Path:
    """The synthetic federation the run config describes, written on first use.

    Race-safe when several ClientApps start at once: each writes into its own temp
    sibling folder and renames it into place; whoever finds the target already there
    discards its copy (the same parameters give the same bytes).
    """
    target = (cache or synthetic_root()) / synthetic_name(run)
    if target.is_dir():
        return target
    try:
        synth_cfg = synth.SynthConfig(
            sites=run.synth_sites,
            cases_per_site=run.synth_cases_per_site,
            seed=run.seed,
            label_skew=run.synth_label_skew or None,  # 0 = balanced
            image_size=run.image_size,
            labels=run.label_set,
        )
    except ValidationError as exc:
        raise SiteConfigError(
            "sites-dir='' asks for synthetic hospitals, but the run config does not fit "
            f"them: {messages(exc)[0]}"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        synth.write_federation(tmp, synth_cfg)
        try:
            os.rename(tmp, target)
            log.info("synthetic federation written to %s", target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
