"""The LOO plot shows the LOO *effect* (issue 16.6): the ground-truth stage trains LOO's full
model(s) with the runs' shared seed and records their per-test loss (stamped, checksummed, with
the stacked weights); merge carries it; evaluate puts the full loss next to the LOO losses; the
report plots LOO loss minus full loss.

Oracle: the full model's loss recomputed independently from its checkpoint (the setting's own
``nn.Module`` in float64 and ``F.cross_entropy``), and the LOO losses read from the merged file."""

from __future__ import annotations

import json

import matplotlib.axes
import numpy as np
import pytest
import torch
from pipeline_helpers import make_workspace
from safetensors.torch import load_file
from torch.nn import functional as F

from tdabench._io import read_parquet
from tdabench.benchmark import get_setting
from tdabench.groundtruth import GroundTruthStore, load_runs
from tdabench.groundtruth.engine import load_full
from tdabench.pipeline import report as report_mod
from tdabench.pipeline.cli import _layered_config, main
from tdabench.pipeline.config import paths, stage_spec
from tdabench.pipeline.io import write_scores
from tdabench.pipeline.stages.evaluate import evaluate


@pytest.fixture
def loo(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws", loo_indices=4)  # 600 digits, 4 removals, debug launcher
    monkeypatch.chdir(ws)
    monkeypatch.delenv("TDABENCH_STAGES", raising=False)
    monkeypatch.delenv("TDABENCH_LAUNCHER", raising=False)
    base = ["--benchmark", "mnist_lr", "--kind", "loo"]
    assert main(["groundtruth", *base]) == 0
    assert main(["merge", *base]) == 0
    cfg = _layered_config("configs/default.yaml", {})
    return ws, cfg, paths(cfg, "mnist_lr")["groundtruth"]["loo"]


def test_full_model_loss_equals_recomputation_from_its_checkpoint(loo):
    _ws, cfg, gt = loo
    store = GroundTruthStore(gt["dir"])
    recorded = load_full(store, "loss")  # (runs, n_test), verified
    weights = load_file(str(store.full_checkpoint_path))
    bc = cfg["benchmark_configs"]["mnist_lr"]
    setting = get_setting(bc["setting"], **bc["overrides"], **bc["recipe"])
    data = setting.load(seed=bc["data"]["seed"])
    x, y = data.test[0].double(), data.test[1]
    assert recorded.shape == (1, len(y))
    for r in range(recorded.shape[0]):
        model = setting.build_model().double()
        model.load_state_dict({k: v[r].double() for k, v in weights.items()})
        with torch.no_grad():
            oracle = F.cross_entropy(model(x), y, reduction="none")
        torch.testing.assert_close(recorded[r], oracle, rtol=1e-5, atol=1e-6)
    # the merged file carries the same values in its verified stamps
    _, meta = read_parquet(gt["merged"], key=store.key)
    full = json.loads(meta["full_model"])
    assert np.array_equal(np.asarray(full["values"]["loss"]), recorded.numpy())
    # the LOO models share the full model's seed: each LOO loss differs from it only a little
    loo_values, _, _ = load_runs(gt["merged"], "loss")
    effect = loo_values[:, 0, :] - recorded[0]
    assert effect.abs().max() < 0.1 * recorded.abs().max()
    assert effect.abs().max() > 0  # ... but does differ


def test_report_plots_loo_loss_minus_full_loss(loo, tmp_path, monkeypatch):
    ws, cfg, gt = loo
    spec = stage_spec(cfg, "evaluate", "mnist_lr", method="grad_dot")
    spec["metrics"] = ["loo"]
    _, meta = read_parquet(gt["merged"])
    n_test = len(json.loads(meta["full_model"])["values"]["loss"][0])
    rng = np.random.default_rng(0)
    scores = ws / "scores.parquet"
    prov = {"benchmark": "mnist_lr", "method": "grad_dot"}
    prov["data"] = json.loads(meta["provenance"])["data"]
    write_scores(scores, rng.standard_normal((600, n_test)), {"method": "grad_dot"}, prov)
    curves = ws / "curves.json"
    evaluate(
        spec,
        "mnist_lr",
        str(scores),
        "",
        {"loo": gt["merged"]},
        "",
        str(ws / "m.json"),
        str(curves),
    )
    c = json.loads(curves.read_text())["loo_scatter"]
    j = c["test_index"]
    full = load_full(GroundTruthStore(gt["dir"]), "loss")[:, j].mean().item()
    assert c["full_loss"] == full
    loo_values, _, _ = load_runs(gt["merged"], "loss")
    assert c["loo_loss"] == loo_values[:, :, j].mean(dim=1).tolist()
    drawn = []
    monkeypatch.setattr(
        matplotlib.axes.Axes, "scatter", lambda self, x, y, **kw: drawn.append((list(x), list(y)))
    )
    row = {"benchmark": "mnist_lr", "method": "grad_dot", "_curves": {"loo_scatter": c}}
    assert report_mod._scatter([row], tmp_path / "loo.png")
    assert drawn == [(c["score"], [v - full for v in c["loo_loss"]])]
    assert "minus the full model's" in report_mod.PLOT_CAPTIONS["loo_scatter"]


def test_score_writers_write_the_documented_tables(tmp_path):
    """write_scores / write_self_scores (one shared writer since #15's clean-up) store exactly the
    tables of pipeline.io's docstring: checked against tables built by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tdabench._io import table_digest
    from tdabench.pipeline.io import read_self_scores, write_self_scores

    s = np.random.default_rng(0).standard_normal((5, 3))
    write_scores(tmp_path / "s.parquet", s, {"method": "m"}, {"benchmark": "b"})
    flat = pa.array(s.astype(np.float32).ravel(), pa.float32())
    want = pa.table(
        {
            "train_index": pa.array(np.arange(5), pa.int64()),
            "scores": pa.FixedSizeListArray.from_arrays(flat, 3),
        }
    )
    got = pq.read_table(tmp_path / "s.parquet")
    assert got.replace_schema_metadata(None).equals(want)
    assert got.schema.metadata[b"tdabench.sha256"].decode() == table_digest(want)
    write_self_scores(tmp_path / "self.parquet", torch.arange(4.0), {"method": "m"})
    values, _ = read_self_scores(tmp_path / "self.parquet")
    want = pa.table({"train_index": pa.array(np.arange(4), pa.int64()), "score": pa.array(values)})
    got = pq.read_table(tmp_path / "self.parquet").replace_schema_metadata(None)
    assert got.equals(want) and values.tolist() == [0.0, 1.0, 2.0, 3.0]
