"""Configuration: schema validation with errors naming key and file; spec hashes; paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tdabench.errors import ConfigError
from tdabench.pipeline.config import load_config, paths, resolve_config, spec_hash, stage_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def configs(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    return tmp_path / "configs"


def _edit(path: Path, fn) -> None:
    d = yaml.safe_load(path.read_text())
    fn(d)
    path.write_text(yaml.safe_dump(d))


def _load(configs: Path):
    raw = yaml.safe_load((configs / "default.yaml").read_text())
    raw["configs_dir"] = str(configs)
    if raw["benchmarks"] == ["mnist_lr_demo", "mnist_mlp_demo"]:  # shipped default
        raw["benchmarks"] = ["mnist_lr", "mnist_mlp"]  # the files these tests edit
    return resolve_config(raw, source=str(configs / "default.yaml"))


def test_shipped_configs_are_valid():
    cfg = load_config(REPO / "configs/default.yaml")
    assert cfg["benchmarks"] == ["mnist_lr_demo", "mnist_mlp_demo"]
    assert cfg["launcher"]["kind"] == "local"
    # defaults from the schema are filled in
    assert cfg["launcher"]["slurm"]["timeout_min"] == 60
    # the run's attributors plus the per-benchmark lists (the MLP's last-layer IF variants)
    assert set(cfg["attributors"]) <= set(cfg["attributor_configs"])
    # every shipped benchmark and attributor file validates on its own
    for b in sorted((REPO / "configs/benchmarks").glob("*.yaml")):
        c = load_config(REPO / "configs/default.yaml", {"benchmarks": [b.stem]})
        setting = c["benchmark_configs"][b.stem]["setting"]
        assert b.stem == setting or b.stem.startswith(setting + "_"), (b.stem, setting)
    # every shipped run configuration (full, smoke, the GPU ones) validates
    import yaml

    for run in sorted((REPO / "configs").glob("*.yaml")):
        c = load_config(REPO / "configs/default.yaml", yaml.safe_load(run.read_text()))
        assert c["benchmarks"], run
    # every shipped attributor file validates, and its projector settings resolve
    from tdabench.func.projection import resolve_projector_kwargs

    for a in sorted((REPO / "configs/attributors").glob("*.yaml")):
        c = load_config(REPO / "configs/default.yaml", {"attributors": [a.stem]})
        params = c["attributor_configs"][a.stem]["params"]
        proj = {k: params[k] for k in ("proj_dim", "proj_type", "seed") if k in params}
        if proj:
            assert resolve_projector_kwargs(proj)["proj_type"] == proj.get(
                "proj_type", "gaussian"
            ), a


def test_unknown_key_names_key_and_file(configs):
    _edit(
        configs / "benchmarks/mnist_lr.yaml", lambda d: d["groundtruth"]["lds"].update(num_subset=3)
    )
    with pytest.raises(ConfigError) as e:
        _load(configs)
    msg = str(e.value)
    assert (
        "benchmarks/mnist_lr.yaml" in msg
        and "groundtruth.lds.num_subset" in msg
        and "unknown key" in msg
    )


def test_unknown_top_level_key(configs):
    _edit(configs / "default.yaml", lambda d: d.update(benchmark=["x"]))
    with pytest.raises(ConfigError, match=r"default.yaml.*unknown key 'benchmark'"):
        _load(configs)


def test_wrong_type_names_key_and_file(configs):
    _edit(
        configs / "benchmarks/mnist_lr.yaml",
        lambda d: d["groundtruth"]["lds"].update(num_subsets="fifty"),
    )
    with pytest.raises(
        ConfigError, match=r"mnist_lr.yaml.*'groundtruth.lds.num_subsets'.*'fifty'.*integer"
    ):
        _load(configs)


def test_unknown_method_names_file(configs):
    _edit(configs / "attributors/if_cg.yaml", lambda d: d.update(method="IFAttributorMagic"))
    with pytest.raises(
        ConfigError, match=r"attributors/if_cg.yaml.*unknown method 'IFAttributorMagic'"
    ):
        _load(configs)


def test_unknown_benchmark_and_attributor_names(configs):
    _edit(configs / "default.yaml", lambda d: d.update(attributors=["if_cg", "nope"]))
    with pytest.raises(
        ConfigError, match=r"no file .*attributors/nope.yaml.*known attributors: .*if_cg"
    ):
        _load(configs)
    _edit(
        configs / "default.yaml", lambda d: d.update(attributors=["if_cg"], benchmarks=["mnist_xx"])
    )
    with pytest.raises(ConfigError, match=r"benchmark 'mnist_xx'.*known benchmarks: .*mnist_lr"):
        _load(configs)


def test_ensemble_too_small_for_trak(configs):
    _edit(configs / "benchmarks/mnist_lr.yaml", lambda d: d["train"].update(ensemble=2))
    with pytest.raises(
        ConfigError, match=r"mnist_lr.yaml.*'train.ensemble' is 2 but an attributor needs 10"
    ):
        _load(configs)


def test_invalid_yaml_names_file(configs):
    (configs / "benchmarks/mnist_lr.yaml").write_text("setting: [unclosed\n")
    with pytest.raises(ConfigError, match=r"mnist_lr.yaml: not valid YAML"):
        _load(configs)


def test_spec_hashes_extend_or_separate_stores():
    cfg = load_config(REPO / "configs/default.yaml", {"benchmarks": ["mnist_lr", "mnist_mlp"]})
    gt = spec_hash(stage_spec(cfg, "groundtruth", "mnist_lr", kind="lds"))
    more = load_config(REPO / "configs/default.yaml", {"benchmarks": ["mnist_lr", "mnist_mlp"]})
    more["benchmark_configs"]["mnist_lr"]["groundtruth"]["lds"]["num_subsets"] = 60
    # raising the count extends the same store ...
    assert spec_hash(stage_spec(more, "groundtruth", "mnist_lr", kind="lds")) == gt
    assert paths(more, "mnist_lr")["groundtruth"]["lds"]["merged"].endswith("merged-60.parquet")
    # ... a training hyper-parameter gives a new store, new models and new scores
    lr = load_config(REPO / "configs/default.yaml", {"benchmarks": ["mnist_lr", "mnist_mlp"]})
    lr["benchmark_configs"]["mnist_lr"]["recipe"]["lr"] = 0.5
    assert spec_hash(stage_spec(lr, "groundtruth", "mnist_lr", kind="lds")) != gt
    p0, p1 = paths(cfg, "mnist_lr"), paths(lr, "mnist_lr")
    assert p0["models"] != p1["models"] and p0["scores"]["if_cg"] != p1["scores"]["if_cg"]
    assert p0["data"] == p1["data"]  # the split does not depend on the recipe
    # an attributor hyper-parameter changes only that attributor's scores
    reg = load_config(REPO / "configs/default.yaml", {"benchmarks": ["mnist_lr", "mnist_mlp"]})
    reg["attributor_configs"]["if_cg"]["params"]["regularization"] = 0.1
    p2 = paths(reg, "mnist_lr")
    assert (
        p2["scores"]["if_cg"] != p0["scores"]["if_cg"]
        and p2["scores"]["grad_dot"] == p0["scores"]["grad_dot"]
    )
    assert p2["metrics"]["if_cg"] == p0["metrics"]["if_cg"] == "results/metrics/mnist_lr/if_cg.json"


def test_metrics_select_groundtruth_kinds():
    cfg = load_config(REPO / "configs/default.yaml", {"benchmarks": ["shakespeare_nanogpt_tiny"]})
    assert list(paths(cfg, "shakespeare_nanogpt_tiny")["groundtruth"]) == ["lds"]
