"""The node decides its training budget; the run config can only lower it, and no number of
the run config can make a node hang. Each test plays a coordinator that writes the run
config, against the ClientApp or the config models the ClientApp reads."""

import math
import time
from pathlib import Path

import pytest
import torch
from annotated_types import Le, Lt
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import app
from client.privacy import MAX_USEFUL_NOISE, LedgerStore
from client.site import (
    DEFAULT_EPSILON_BUDGET,
    NodeConfig,
    SiteConfigError,
    node_settings,
    parse_node_config,
    resolve_site,
    training_cap,
)
from shared_model.contract import wire
from shared_model.contract.packing import unpacked
from shared_model.contract.run_config import (
    MAX_EPSILON,
    MAX_NOISE_MULTIPLIER,
    RunConfig,
    RunConfigError,
    pyproject_defaults,
)
from shared_model.model import MedFuseModel


def _run_config(**overrides: object) -> dict:
    return {**pyproject_defaults(), "image-size": 32, "batch-size": 8,
            "num-server-rounds": 2, **overrides}


def _deployed(site: Path, tmp_path: Path, **keys: object) -> dict:
    """A hospital's --node-config: its site folder and its own ledger store."""
    return {"data-path": str(site), "state-dir": str(tmp_path / "state"), **keys}


def _train(state: dict[str, torch.Tensor]) -> Message:
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(state),
        wire.CONFIG: ConfigRecord({wire.CFG_SERVER_ROUND: 1, wire.CFG_LOCAL_EPOCHS: 1,
                                   wire.CFG_LR: 1e-3, wire.CFG_PROXIMAL_MU: 0.0,
                                   wire.CFG_TOTAL_ROUNDS: 2}),
    })
    meta = Metadata(run_id=7, message_id="m1", src_node_id=1, dst_node_id=11,
                    reply_to_message_id="", group_id="1", created_at=time.time(),
                    ttl=DEFAULT_TTL, message_type="train")
    return Message(content=content, metadata=meta)


def _context(run_config: dict, node_config: dict) -> Context:
    return Context(run_id=7, node_id=11, node_config=node_config, state=RecordDict(),
                   run_config=run_config)


@pytest.fixture(scope="module")
def global_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return MedFuseModel(RunConfig.parse(_run_config()).model()).state_dict()


# ----------------------------------------------------------------- the node's budget


def test_a_run_asking_a_huge_epsilon_trains_a_deployed_node_to_its_own_budget(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: a hospital whose node config says nothing about its budget; a coordinator
    # asking for the largest epsilon a run config may name, the noise derived from it
    run_config = _run_config(epsilon=MAX_EPSILON, **{"noise-multiplier": 0.0})
    node = _deployed(tiny_federation[0], tmp_path)
    # Execute
    reply = unpacked(app(_train(global_state), _context(run_config, node)))
    # Assert: it trained, to a budget of 8, not the run's 1000
    assert not reply.has_error()
    assert wire.ARRAYS in reply.content.array_records
    metrics = reply.content.metric_records[wire.METRICS]
    assert 0 < metrics[wire.M_EPSILON] <= DEFAULT_EPSILON_BUDGET
    assert metrics[wire.M_EPSILON] + metrics[wire.M_BUDGET_LEFT] == pytest.approx(
        DEFAULT_EPSILON_BUDGET)
    store = LedgerStore(tmp_path / "state")
    (key,) = store.keys()
    ledger = store.load(key)
    assert ledger.epsilon_budget == DEFAULT_EPSILON_BUDGET
    # the noise was planned for 8 over the run's rounds, not for 1000 (noise 0.013 then)
    dp_sgd = [e for e in ledger.entries if e.kind == "dp-sgd"]
    assert dp_sgd and dp_sgd[0].noise_multiplier > 0.3


def test_a_run_config_beyond_the_bound_is_refused_before_any_data_is_touched(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: the measured attack's run config
    run_config = _run_config(epsilon=10_000.0)
    node = _deployed(tiny_federation[0], tmp_path)
    # Execute / Assert: refused with the key, the value and the bound; no ledger written
    reply = app(_train(global_state), _context(run_config, node))
    site = reply.content.config_records[wire.SITE]
    assert site[wire.SITE_ERROR] == wire.ERR_CONFIG and not reply.content.array_records
    assert "epsilon" in site[wire.SITE_DETAIL]
    assert "10000" in site[wire.SITE_DETAIL] and "1000" in site[wire.SITE_DETAIL]
    assert not (tmp_path / "state").exists() or not LedgerStore(tmp_path / "state").keys()


@pytest.mark.parametrize(("node_keys", "run_epsilon", "cap"), [
    ({}, 1000.0, DEFAULT_EPSILON_BUDGET),  # the node's default, whatever the run asks
    ({}, 3.0, 3.0),  # the run lowers it
    ({"epsilon-budget": 20.0}, 1000.0, 20.0),  # the hospital chose more
    ({"epsilon-budget": 20.0}, 16.0, 16.0),
    ({"epsilon-budget": 2.0}, 16.0, 2.0),
])
def test_a_deployed_nodes_cap_is_its_own_budget_lowered_by_the_run(
    tiny_federation: list[Path], tmp_path: Path, node_keys: dict, run_epsilon: float,
    cap: float
) -> None:
    run = RunConfig.parse(_run_config(epsilon=run_epsilon))
    choice = resolve_site(_deployed(tiny_federation[0], tmp_path, **node_keys), run)
    assert choice.epsilon_budget == cap and not choice.simulation


def test_a_deployed_node_never_takes_its_budget_from_sim_node_config(
    tiny_federation: list[Path], tmp_path: Path
) -> None:
    run = RunConfig.parse(_run_config(epsilon=500.0,
                                      **{"sim-node-config": "epsilon-budget=500.0"}))
    node = node_settings(_deployed(tiny_federation[0], tmp_path), run)
    assert training_cap(node, run) == DEFAULT_EPSILON_BUDGET


@pytest.mark.parametrize(("sim_node_config", "run_epsilon", "cap"), [
    ("", 16.0, 16.0),  # the researcher's run: its epsilon is the simulated node's budget
    ("", 50.0, 50.0),
    ("epsilon-budget=4.0", 16.0, 4.0),  # sim-node-config plays the node config
    ("epsilon-budget=40.0", 16.0, 16.0),  # and the run still only lowers it
])
def test_a_simulated_nodes_budget_is_the_researchers(
    tiny_federation: list[Path], sim_node_config: str, run_epsilon: float, cap: float
) -> None:
    run = RunConfig.parse(_run_config(epsilon=run_epsilon, **{
        "sites-dir": str(tiny_federation[0].parent), "sim-node-config": sim_node_config}))
    choice = resolve_site({"partition-id": 0, "num-partitions": 2}, run)
    assert choice.simulation and choice.epsilon_budget == cap


# ----------------------------------------------------------------- bounded numbers


FLOAT_KEYS = [f.alias for f in RunConfig.model_fields.values() if f.annotation is float]


def test_every_number_of_the_run_config_has_an_upper_bound() -> None:
    # a new numeric key without a bound fails here, not on a node
    unbounded = [f.alias for f in RunConfig.model_fields.values()
                 if f.annotation in (int, float)
                 and not any(isinstance(m, Le | Lt) for m in f.metadata)]
    assert not unbounded, unbounded
    assert "noise-multiplier" in FLOAT_KEYS and "epsilon" in FLOAT_KEYS


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_no_float_of_the_run_config_may_be_infinite_or_nan(key: str, value: float) -> None:
    t0 = time.perf_counter()
    with pytest.raises(RunConfigError) as exc:
        RunConfig.parse(_run_config(**{key: value}))
    assert time.perf_counter() - t0 < 1.0
    message = str(exc.value)
    assert f"  {key}: " in message and ("finite" in message or "less than" in message), message


def test_noise_multiplier_above_the_ledgers_bound_is_refused() -> None:
    # the run config's bound is the ledger's: a run may ask no noise a ledger cannot record
    assert MAX_NOISE_MULTIPLIER == MAX_USEFUL_NOISE
    RunConfig.parse(_run_config(**{"noise-multiplier": MAX_NOISE_MULTIPLIER}))
    with pytest.raises(RunConfigError, match="noise-multiplier: Input should be less than or "
                                             "equal to 50"):
        RunConfig.parse(_run_config(**{"noise-multiplier": MAX_NOISE_MULTIPLIER * 1.01}))


def test_infinite_noise_no_longer_holds_a_node(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: the measured hang (over 30 s, with the ledger store locked)
    run_config = _run_config(**{"noise-multiplier": math.inf})
    node = _deployed(tiny_federation[0], tmp_path)
    # Execute
    t0 = time.perf_counter()
    reply = app(_train(global_state), _context(run_config, node))
    seconds = time.perf_counter() - t0
    # Assert: refused at once with the key and what is allowed; the store untouched
    assert seconds < 5.0, seconds
    site = reply.content.config_records[wire.SITE]
    assert site[wire.SITE_ERROR] == wire.ERR_CONFIG
    assert "noise-multiplier" in site[wire.SITE_DETAIL] and "finite" in site[wire.SITE_DETAIL]
    assert not (tmp_path / "state").exists() or not LedgerStore(tmp_path / "state").keys()


@pytest.mark.parametrize("key", [
    f.alias for f in NodeConfig.model_fields.values() if f.annotation in (float, float | None)])
@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_no_float_of_the_node_config_may_be_infinite_or_nan(key: str, value: float) -> None:
    with pytest.raises(SiteConfigError) as exc:
        parse_node_config({"data-path": "/site", key: value})
    assert f"  {key}: " in str(exc.value), str(exc.value)


@pytest.mark.parametrize(("keys", "named"), [
    ({"secagg-min-threshold": 0.4}, "secagg-min-threshold"),
    ({"secagg-min-shares": 1}, "secagg-min-shares"),
])
def test_a_node_cannot_weaken_secure_aggregation_below_a_majority(keys: dict,
                                                                  named: str) -> None:
    with pytest.raises(SiteConfigError, match=named):
        parse_node_config({"data-path": "/site", **keys})


# ----------------------------------------------------------------- the chain key


def test_a_node_key_keys_the_ledger_and_the_audit_log_and_no_key_file_is_written(
    tiny_federation: list[Path], tmp_path: Path, global_state: dict
) -> None:
    # Prepare: a hospital that points node-key at its SuperNode key (EC P-384, OpenSSH)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from shared_model import audit_log
    from shared_model.chain_key import key_from_node_key

    key_file = tmp_path / "supernode.key"
    key_file.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    node = _deployed(tiny_federation[0], tmp_path, **{"node-key": str(key_file)})
    # Execute
    reply = app(_train(global_state), _context(_run_config(), node))
    # Assert: trained; the store holds no key of its own; the ledger and the log verify
    # under the node key's chain key and under no other
    assert wire.ARRAYS in unpacked(reply).content.array_records
    state = tmp_path / "state"
    assert not (state / "chain.key").exists()
    key = key_from_node_key(key_file)
    (ledger_key,) = LedgerStore(state, key=key).keys()
    assert LedgerStore(state, key=key).load(ledger_key).entries
    assert audit_log.verify(state / audit_log.LOG_FILE, key=key)
    with pytest.raises(Exception):  # noqa: B017 - whichever refusal the wrong key meets
        LedgerStore(state, key=b"\0" * 32).load(ledger_key)
