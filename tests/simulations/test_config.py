"""The simulation config: defaults, bad keys and values, cross-field rules, expansion."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from client.site import DEFAULT_EPSILON_BUDGET, node_settings, training_cap
from shared_model.contract.run_config import RunConfig
from simulations.config import (
    ConfigError,
    SimulationConfig,
    load_config,
    parse_config,
    select_experiments,
)
from simulations.sites import _synthetic_sites

FED = {"name": "fed", "kind": "federated"}


def _raw(**sections: object) -> dict:
    raw: dict = {"experiment": [dict(FED)]}
    raw.update(sections)
    return raw


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "test.toml")
    return str(info.value)


def test_builtin_default_is_the_demo() -> None:
    # Execute
    cfg = load_config()

    # Assert: five skewed synthetic hospitals; pooled, local-only, the public model alone,
    # local DP fine-tuning, FedAvg, FedAvg + DP eps 8, the federations from the public start
    assert cfg.sites.source == "synthetic" and cfg.sites.num_hospitals == 5
    assert cfg.sites.label_skew > 0
    exps = {e.name: e for e in cfg.experiments}
    assert [e.kind for e in cfg.experiments] == [
        "pooled", "local", "public", "local", "federated", "federated"]
    assert cfg.public.enabled and exps["local-dp"].dp
    assert cfg.uses_public(exps["fedavg"]) and cfg.uses_public(exps["fedavg-dp"])
    assert exps["fedavg"].strategy == "fedavg" and not exps["fedavg"].dp
    assert exps["fedavg-dp"].dp and exps["fedavg-dp"].epsilon == 8.0
    assert cfg.resources.client_cpus == 1
    assert cfg.out is not None and cfg.out.is_absolute()


def test_dp_target_config_is_the_issue_target_set() -> None:
    # Execute: the shipped config for the federated-app issue's utility target
    cfg = load_config(Path(__file__).parents[2] / "simulations" / "dp-target.toml")

    # Assert: 5 non-IID hospitals x 400 cases; pooled vs FedAvg with DP at epsilon 8
    assert cfg.sites.num_hospitals == 5 and cfg.sites.cases_per_site == 400
    assert cfg.sites.label_skew == 0.5
    exps = {e.name: e for e in cfg.experiments}
    assert exps["pooled"].kind == "pooled" and not exps["fedavg"].dp
    assert exps["fedavg-dp"].dp and exps["fedavg-dp"].epsilon == 8.0


def test_dp_hard_config_is_the_far_public_start_world() -> None:
    # Execute
    cfg = load_config(Path(__file__).parents[2] / "simulations" / "dp-hard.toml")
    # Assert: the DP target set's hospitals, made hard; an archive labelled from reports
    assert cfg.sites.num_hospitals == 5 and cfg.sites.cases_per_site == 400
    assert cfg.sites.difficulty == "hard" and cfg.sites.label_skew == 0.5
    assert (cfg.public.source, cfg.public.difficulty, cfg.public.labeller) == (
        "synthetic", "hard", "mined")
    assert {e.kind for e in cfg.experiments} == {"public", "local", "pooled", "federated"}


def test_openi_reports_config_is_the_text_only_benchmark(tmp_path: Path) -> None:
    # Prepare: the config names the imported sites under data/ (not in the repository);
    # stand-ins of the same layout are given with --sites
    sites = []
    for i in range(5):
        (tmp_path / f"site-0{i}").mkdir()
        sites.append(tmp_path / f"site-0{i}")

    # Execute
    cfg = load_config(Path(__file__).parents[2] / "simulations" / "openi-reports.toml",
                      sites=sites)

    # Assert: the report branch alone everywhere; pooled, local-only, FedAvg, FedAvg + DP
    # at epsilon 8 and the bag-of-words baseline, all on the five imported hospitals
    exps = {e.name: e for e in cfg.experiments}
    assert {e.modality for e in cfg.experiments} == {"text"}
    assert sorted(e.kind for e in cfg.experiments) == [
        "bow", "federated", "federated", "local", "pooled"]
    assert exps["fedavg-dp"].dp and exps["fedavg-dp"].epsilon == 8.0
    assert cfg.sites.num_hospitals == 5 and not cfg.public.enabled


@pytest.mark.parametrize(("extra", "words"), [
    ({"dp": True}, ["dp=true", "bow baseline trains centrally"]),
    ({"audit": True}, ["audit=true", "pooled and federated experiments only"]),
])
def test_the_bow_baseline_has_no_dp_and_no_audit(extra: dict, words: list[str]) -> None:
    message = _error({"experiment": [{"name": "b", "kind": "bow", **extra}]})
    assert all(w in message for w in words), message


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"sites": {"cont": 5}}, "sites.cont"),
        ({"training": {"round": 3}}, "training.round"),
        ({"experiment": [{**FED, "epsilom": 1.0}]}, "experiment[0] (fed).epsilom"),
    ],
)
def test_unknown_key_is_named(raw: dict, key: str) -> None:
    # Execute
    message = _error(_raw(**raw) if "experiment" not in raw else raw)

    # Assert
    assert key in message and "Extra inputs are not permitted" in message
    assert "test.toml" in message


@pytest.mark.parametrize(
    ("raw", "key", "value"),
    [
        (
            {"experiment": [{**FED, "dp": True, "epsilon": -1.0}]},
            "experiment[0] (fed).epsilon",
            "-1.0",
        ),
        ({"experiment": [{**FED, "strategy": "fedfoo"}]}, "experiment[0] (fed).strategy", "fedfoo"),
        ({"experiment": [FED], "training": {"rounds": 0}}, "training.rounds", "0"),
        ({"experiment": [FED], "resources": {"client-cpus": 0}}, "resources.client-cpus", "0"),
        ({"experiment": [FED], "resources": {"device": "tpu"}}, "resources.device", "tpu"),
        ({"experiment": [FED], "sites": {"partition": "random"}}, "sites.partition", "random"),
        ({"experiment": [FED], "seeds": [1, 1]}, "seeds", "repeats"),
        ({"experiment": [{**FED, "name": "a/b"}]}, "experiment[0] (a/b).name", "a/b"),
    ],
)
def test_bad_value_is_named_with_the_value(raw: dict, key: str, value: str) -> None:
    # Execute
    message = _error(raw)

    # Assert
    assert f"{key}:" in message and value in message


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"experiment": [{**FED, "epsilon": 4.0}]}, ["dp=false"]),
        (
            {"experiment": [{**FED, "dp": True, "epsilon": 4.0, "epsilons": [1.0]}]},
            ["epsilon or epsilons"],
        ),
        (
            {"experiment": [{"name": "p", "kind": "pooled", "strategy": "krum"}]},
            ["strategy", "federated experiments only"],
        ),
        ({"experiment": [{"name": "p", "kind": "pooled", "dp": True}]}, ["without DP"]),
        ({"experiment": [{"name": "p", "kind": "public"}]}, ["[public]"]),
        ({"experiment": [FED], "sites": {"partition": "dirichlet"}}, ["sites.hospitals"]),
        ({"experiment": [FED], "sites": {"hospitals": 10}}, ["sites.partition"]),
        ({"experiment": [FED], "sites": {"source": "folders"}}, ["sites.folders"]),
        (
            {
                "experiment": [FED],
                "sites": {"source": "folders", "folders": ["/a", "/b"], "count": 3},
            },
            ["sites.count", "synthetic"],
        ),
        (
            {
                "experiment": [FED],
                "sites": {"source": "folders", "folders": ["/a", "/b"], "difficulty": "hard"},
            },
            ["sites.difficulty", "synthetic"],
        ),
        ({"experiment": [FED], "public": {"labeller": "mined"}}, ["public.labeller", "synthetic"]),
        ({"experiment": [FED], "sites": {"count": 1}}, ["at least 2 hospitals"]),
        ({"experiment": [{**FED, "strategy": "fedprox"}]}, ["fed", "proximal-mu"]),
        ({"experiment": [{**FED, "run-config": {"seed": 3}}]}, ["run-config", "seed", "seeds"]),
        ({"experiment": [{**FED, "run-config": {"proximal-mu": -1}}]}, ["proximal-mu", "-1"]),
        # every number of the run config is bounded and finite, named where it was written
        (
            {"experiment": [{**FED, "dp": True, "epsilon": 5000.0}]},
            ["'fed'", "epsilon", "less than or equal to 1000", "5000"],
        ),
        (
            {"experiment": [{**FED, "run-config": {"noise-multiplier": math.inf}}]},
            ["'fed'", "noise-multiplier", "finite"],
        ),
        (
            {"experiment": [{**FED, "run-config": {"secagg-threshold": 0.5}}]},
            ["'fed'", "secagg-threshold", "greater than 0.5"],
        ),
        ({"experiment": [FED, dict(FED)]}, ["'fed'", "used twice"]),
        (
            {
                "experiment": [
                    {**FED, "dp": True, "epsilons": [1.0, 2.0]},
                    {**FED, "name": "fed-eps2"},
                ]
            },
            ["'fed-eps2'", "used twice"],
        ),
        ({"experiment": [FED], "model": {"image-size": 36}}, ["model", "image_size=36"]),
        ({"experiment": []}, ["experiment", "at least 1"]),
    ],
)
def test_cross_field_rules(raw: dict, words: list[str]) -> None:
    # Execute
    message = _error(raw)

    # Assert
    for w in words:
        assert w in message, message


def test_epsilons_and_modalities_expand() -> None:
    # Prepare
    raw = {
        "experiment": [
            {
                "name": "dp",
                "kind": "federated",
                "dp": True,
                "epsilons": [1.0, 8.0],
                "modalities": ["image", "text"],
            },
            {"name": "pooled", "kind": "pooled", "modality": "image"},
        ]
    }

    # Execute
    cfg = parse_config(raw)

    # Assert
    names = [e.name for e in cfg.experiments]
    assert names == ["dp-image-eps1", "dp-image-eps8", "dp-text-eps1", "dp-text-eps8", "pooled"]
    by_name = {e.name: e for e in cfg.experiments}
    assert by_name["dp-text-eps8"].modality == "text" and by_name["dp-text-eps8"].epsilon == 8
    assert {e.series for e in cfg.experiments[:4]} == {"dp"}
    flat = cfg.flower_run_config(
        by_name["dp-image-eps1"], seed=3, sites_dir=Path("/s"), output_dir=Path("/o")
    )
    assert flat["epsilon"] == 1.0 and flat["dp"] is True and flat["modality"] == "image"
    assert flat["seed"] == 3 and flat["sites-dir"] == "/s" and flat["output-dir"] == "/o"
    assert flat["min-available-nodes"] == cfg.sites.num_hospitals


def test_a_simulated_hospital_trains_to_its_experiments_epsilon() -> None:
    # Prepare: the privacy-utility curve up to epsilon 16, above a deployed node's default,
    # and an experiment that simulates hospitals with a budget of their own
    cfg = parse_config({"experiment": [
        {**FED, "dp": True, "epsilons": [1.0, 16.0]},
        {**FED, "name": "own", "dp": True, "epsilon": 16.0,
         "run-config": {"sim-node-config": "epsilon-budget=4.0"}},
    ]})
    sim = {"partition-id": 0, "num-partitions": cfg.sites.num_hospitals}

    def cap(name: str, node_config: dict) -> float:
        exp = next(e for e in cfg.experiments if e.name == name)
        run = RunConfig.parse(cfg.flower_run_config(exp, seed=0, sites_dir=Path("/s"),
                                                    output_dir=Path("/o")))
        return training_cap(node_settings(node_config, run), run)

    # Execute / Assert: the harness passes no budget; the simulated node's is the run's
    # epsilon (the researcher's), unless the experiment's sim-node-config names one
    assert cap("fed-eps1", sim) == 1.0 and cap("fed-eps16", sim) == 16.0
    assert cap("own", sim) == 4.0
    # a deployed node under the same run config keeps its own default budget
    assert cap("fed-eps16", {"data-path": "/site"}) == DEFAULT_EPSILON_BUDGET


def test_min_nodes_follow_the_fractions() -> None:
    # Prepare
    cfg = parse_config(
        {"sites": {"count": 10}, "experiment": [{**FED, "run-config": {"fraction-train": 0.5}}]}
    )

    # Execute
    flat = cfg.flower_run_config(
        cfg.experiments[0], seed=0, sites_dir=Path("/s"), output_dir=Path("/o")
    )

    # Assert
    assert flat["min-train-nodes"] == 5 and flat["min-evaluate-nodes"] == 10
    assert flat["min-available-nodes"] == 10


def test_resolved_toml_loads_back_to_the_same_config() -> None:
    # Prepare
    raw = {
        "name": "study",
        "seeds": [0, 1],
        "sites": {
            "source": "folders",
            "folders": ["/data/a", "/data/b", "/data/c"],
            "partition": "dirichlet",
            "hospitals": 12,
            "alpha": 0.3,
        },
        "training": {"rounds": 3, "run-config": {"max-grad-norm": 0.5}},
        "experiment": [
            {"name": "pooled", "kind": "pooled", "modalities": ["image", "text"]},
            {
                "name": "prox",
                "kind": "federated",
                "strategy": "fedprox",
                "run-config": {"proximal-mu": 0.01},
                "dp": True,
                "epsilons": [2.0, 4.0],
            },
        ],
    }
    cfg = parse_config(raw)

    # Execute
    again = parse_config(tomllib.loads(cfg.to_toml()))

    # Assert
    assert again == cfg
    default = load_config()
    assert parse_config(tomllib.loads(default.to_toml())) == default


def test_sites_override_and_relative_paths(tmp_path: Path) -> None:
    # Prepare: a config with relative folders, next to them
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "study.toml"
    path.write_text(
        'out = "results"\n[sites]\nsource = "folders"\nfolders = ["../a", "../b"]\n'
        '[[experiment]]\nname = "fed"\nkind = "federated"\n'
    )

    # Execute
    cfg = load_config(path)
    demo_on_sites = load_config(
        sites=[tmp_path / "x", tmp_path / "y", tmp_path / "z"],
        rounds=2,
        seeds=[4, 5],
        out=tmp_path / "o",
    )

    # Assert
    assert cfg.sites.folders == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())
    assert cfg.out == (tmp_path / "cfg" / "results").resolve()
    assert demo_on_sites.sites.source == "folders" and demo_on_sites.sites.num_hospitals == 3
    assert demo_on_sites.training.rounds == 2 and demo_on_sites.seeds == (4, 5)
    assert demo_on_sites.out == (tmp_path / "o").resolve()
    assert [e.name for e in demo_on_sites.experiments] == [
        e.name for e in load_config().experiments
    ]


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    # Prepare
    bad = tmp_path / "bad.toml"
    bad.write_text("[sites\ncount = 3\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("text", ["", '[[experiment]]\nname = "mine"\n'])
def test_a_minimal_config_points_to_the_demo_config(tmp_path: Path, text: str) -> None:
    # Prepare: an empty file, and one with an experiment's name only
    path = tmp_path / "mine.toml"
    path.write_text(text)

    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(path)

    # Assert: what is missing, then one hint line naming the demo config
    lines = str(info.value).splitlines()
    assert "Field required" in lines[1]
    hints = [line for line in lines if "hint" in line]
    assert len(hints) == 1 and "simulations/default.toml" in hints[0]
    assert "hint" not in _error(_raw(seeds=[-1]))  # a bad value needs no hint


def test_fingerprint_follows_what_decides_the_result() -> None:
    # Prepare
    base = parse_config({"experiment": [FED, {"name": "p", "kind": "pooled"}]})
    more_rounds = parse_config(
        {"experiment": [FED, {"name": "p", "kind": "pooled"}], "training": {"rounds": 9}}
    )
    other_cpus = parse_config(
        {"experiment": [FED, {"name": "p", "kind": "pooled"}], "resources": {"client-cpus": 2}}
    )
    fed = base.experiments[0]

    # Execute / Assert
    assert base.fingerprint(fed, 0) == other_cpus.fingerprint(fed, 0)
    assert base.fingerprint(fed, 0) != more_rounds.fingerprint(fed, 0)
    assert base.fingerprint(fed, 0) != base.fingerprint(fed, 1)


def test_select_experiments() -> None:
    # Prepare
    cfg = parse_config(
        {
            "experiment": [
                {"name": "p", "kind": "pooled"},
                {"name": "dp", "kind": "federated", "dp": True, "epsilons": [1.0, 2.0, 8.0]},
            ]
        }
    )

    # Execute
    picked = select_experiments(cfg, ["dp-eps2", "p"])

    # Assert
    assert [e.name for e in picked.experiments] == ["p", "dp-eps2"]
    with pytest.raises(ConfigError, match="no such experiment"):
        select_experiments(cfg, ["nope"])


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        cfg.seeds = (1,)  # type: ignore[misc]
    assert isinstance(cfg, SimulationConfig)


def test_sites_style_reaches_the_synthetic_hospitals(tmp_path: Path) -> None:
    # Prepare
    cfg = parse_config({"experiment": [FED], "model": {"image-size": 16},
                        "sites": {"count": 2, "cases-per-site": 10, "style": "unseen"}})
    # Execute
    base = _synthetic_sites(cfg, tmp_path, lambda _: None)
    # Assert: the unseen styles' reports, and "house" is the default
    text = (base / "site-00" / "manifest.csv").read_text()
    assert "OBSERVATIONS:" in text or "Summary:" in text
    assert parse_config({"experiment": [FED]}).sites.style == "house"
    assert "sites.style" in _error({"experiment": [FED], "sites": {"source": "folders",
                                                                   "folders": ["/a", "/b"],
                                                                   "style": "unseen"}})
    assert "style" in _error({"experiment": [FED], "sites": {"style": "other"}})


def test_public_views_and_sites_style_count_in_the_fingerprint_only_when_set() -> None:
    # Prepare
    exps = [FED, {"name": "pub", "kind": "public"}]
    base = parse_config({"experiment": exps, "public": {"source": "synthetic"}})
    same = parse_config({"experiment": exps, "public": {"source": "synthetic", "views": "none"},
                         "sites": {"style": "house"}})
    views = parse_config({"experiment": exps, "public": {"source": "synthetic",
                                                         "views": "strong"}})
    unseen = parse_config({"experiment": exps, "public": {"source": "synthetic"},
                           "sites": {"style": "unseen"}})
    pub = base.experiments[1]
    # Assert: defaults leave fingerprints as they were; a setting makes a new experiment
    assert base.public.views == "none" and views.public.views == "strong"
    assert base.fingerprint(pub, 0) == same.fingerprint(pub, 0)
    assert base.fingerprint(pub, 0) != views.fingerprint(pub, 0)
    assert base.fingerprint(pub, 0) != unseen.fingerprint(pub, 0)
    assert "views" in _error({"experiment": [FED], "public": {"views": "wild"}})
    assert parse_config(tomllib.loads(views.to_toml())) == views
