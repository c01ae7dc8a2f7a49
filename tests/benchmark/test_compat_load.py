"""load_benchmark: dattri's (model_details, groundtruth) from a tiny store produced here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from tdabench.benchmark import get_setting
from tdabench.benchmark.load import load_benchmark
from tdabench.errors import ConfigError, DataError, StoreError
from tdabench.groundtruth import GroundTruthSpec, load_runs, merge, open_store, run_shards
from tdabench.groundtruth.trainer import make_trainer
from tdabench.pipeline import stages

PREP = {
    "stage": "prepare",
    "format": 1,
    "setting": "mnist_lr",
    "overrides": {"n_train": 40, "n_test": 6},
    "data": {"seed": 0, "num_test": None},
    "data_root": None,
    "auc": {"noise_fraction": 0.1, "seed": 0},
}
RECIPE = {"epochs": 1, "batch_size": 8}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results/mnist_lr/{data,models,groundtruth/lds} made by the pipeline's library functions."""
    root = tmp_path_factory.mktemp("results")
    b = root / "mnist_lr"
    stages.prepare(PREP, str(b / "data" / "d0"))
    train_spec = {
        "stage": "train",
        "prepare": PREP,
        "recipe": RECIPE,
        "train": {"seed": 0, "ensemble": 2, "checkpoints": 1},
    }
    stages.train(train_spec, str(b / "data" / "d0"), str(b / "models" / "m0"), device="cpu")
    # the ground-truth store, opened as the pipeline's groundtruth stage does (data={"meta": ...})
    setting = get_setting("mnist_lr", **PREP["overrides"], **RECIPE)
    data = setting.load(data_root=None, seed=0)
    trainer = make_trainer(setting, data, batched=True, device="cpu")
    gspec = GroundTruthSpec(
        kind="lds",
        num_subsets=5,
        subset_ratio=0.5,
        num_runs=1,
        seed=0,
        shard_size=3,
        targets=("margin",),
        n_train=trainer.n_train,
    )
    store_dir = b / "groundtruth" / "lds" / "g0"
    store = open_store(store_dir, gspec, trainer, data={"meta": data.meta})
    run_shards(store, gspec, trainer, progress=False)
    shutil.copyfile(merge(store, gspec), store_dir / "merged-5.parquet")
    return root


def test_load_benchmark_returns_the_store_and_its_setting(results):
    details, (values, indices) = load_benchmark("lr", "mnist", "lds", download_path=results)
    ref_values, _, ref_subsets = load_runs(
        results / "mnist_lr" / "groundtruth" / "lds" / "g0", "margin"
    )
    assert torch.equal(values, ref_values.mean(1)) and torch.equal(indices, ref_subsets)
    assert values.shape == (5, 6) and indices.shape == (5, 20)
    assert len(details["train_dataset"]) == 40 and len(details["test_dataset"]) == 6
    assert list(details["train_sampler"]) == list(range(40)) and list(
        details["test_sampler"]
    ) == list(range(6))
    assert details["models_half"] == []
    models = details["models_full"]
    manifest = json.loads((results / "mnist_lr" / "models" / "m0" / "manifest.json").read_text())
    assert [p.name for p in models] == [files[-1] for files in manifest["files"]["clean"]] and len(
        models
    ) == 2
    model = details["model"]
    model.load_state_dict(load_file(str(models[0])))
    x, y = details["test_dataset"].tensors
    loader = DataLoader(details["test_dataset"], batch_size=4)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(
        details["loss_func"](models[0], loader),
        F.cross_entropy(logits, y, reduction="none"),
        rtol=0,
        atol=1e-6,
    )
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
    torch.testing.assert_close(
        details["target_func"](models[0], loader), true - others, rtol=0, atol=1e-5
    )
    trained = details["train_func"](DataLoader(details["train_dataset"], batch_size=8), seed=0)
    assert trained.linear.weight.shape == (10, 784)


def test_load_benchmark_errors_name_the_commands(results, tmp_path):
    with pytest.raises(StoreError, match="snakemake groundtruth_mnist_lr"):
        load_benchmark("lr", "mnist", "loo", download_path=results)
    with pytest.raises(StoreError, match="dvc pull"):
        load_benchmark("mlp", "mnist", "lds", download_path=results)
    with pytest.raises(ConfigError, match="never downloads"):
        load_benchmark("lr", "mnist", "lds", download_path=results, redownload=True)
    with pytest.raises(ConfigError, match="unknown benchmark"):
        load_benchmark("gpt2", "wikitext2", "lds", download_path=results)
    with pytest.raises(ConfigError):
        load_benchmark("lr", "mnist", "auc", download_path=results)
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    shutil.rmtree(copy / "mnist_lr" / "data")
    with pytest.raises(DataError, match=r"meta\.json"):
        load_benchmark("lr", "mnist", "lds", download_path=copy)
    shutil.copytree(
        copy / "mnist_lr" / "groundtruth" / "lds" / "g0",
        copy / "mnist_lr" / "groundtruth" / "lds" / "g1",
    )
    with pytest.raises(StoreError, match="2 lds ground truths"):
        load_benchmark("lr", "mnist", "lds", download_path=copy)


def test_unmerged_store_is_read_from_its_shards(results, tmp_path):
    copy = tmp_path / "r"
    shutil.copytree(results, copy)
    (copy / "mnist_lr" / "groundtruth" / "lds" / "g0" / "merged-5.parquet").unlink()
    _, (values, indices) = load_benchmark("lr", "mnist", "lds", download_path=copy)
    _, (ref_values, ref_indices) = load_benchmark("lr", "mnist", "lds", download_path=results)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)
    assert Path(copy).exists()
