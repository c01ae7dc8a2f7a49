"""Plumbing of the GPU side-by-side harness (benchmarks/gpu_compare.py) on the CPU: its
``--small --dry-run`` mode runs every section on tiny synthetic problems, our side only,
in-process. No timing is asserted (tests never check wall-clock time); the oracles are the
table's structure and the retraining row's own batched-vs-sequential agreement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_compare():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_compare

        yield gpu_compare
    finally:
        sys.path.remove(str(BENCH))


def test_dry_run_writes_every_section(gpu_compare, tmp_path):
    out = tmp_path / "gc"
    rc = gpu_compare.main(
        [
            "--device",
            "cpu",
            "--small",
            "--dry-run",
            "--out",
            str(out),
            "--mlp-methods",
            "grad_dot",
            "--resnet-methods",
            "trak_1",
            "if_explicit",
            "--retrain-rows",
            "mlp",
            "resnet9",
        ]
    )
    assert rc == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["device"] == "cpu" and payload["size"] == "dry"
    rows = {
        (r["section"], r["method"] if r["section"] != "retrain" else r["model"]): r
        for r in payload["rows"]
    }
    assert set(rows) == {
        ("mnist_mlp", "grad_dot"),
        ("cifar_resnet9", "trak_1"),
        ("cifar_resnet9", "if_explicit"),
        ("retrain", "mlp"),
        ("retrain", "resnet9"),
    }
    for key, r in rows.items():
        if key[0] == "retrain":
            assert r["ok"], r.get("error")
            # the two trainers train the same model (float32 rounding apart), whatever the speed
            assert r["first_model_rel_diff"] < 1e-3
            assert r["sequential"]["models"] == 1 and r["batched"]["models"] in (2, 3)
        else:
            assert r["ours"]["ok"], r["ours"].get("error")
            assert r["ours"]["time_s"] > 0 and "dattri" not in r  # dry run: our side only
    md = out.with_suffix(".md").read_text()
    assert (
        "| resnet9 | trak_1 |" in md
        and "Retraining throughput" in md
        and "dattri side not run" in md
    )


def test_resnet_copy_matches_the_library_model(gpu_compare):
    """Both sides attribute the plain-torch copy; it must be tdabench's ResNet-9 (same state dict)."""
    import torch

    from tdabench.benchmark.models import ResNet9

    ours, copy = ResNet9(num_classes=10, dropout=0.0), gpu_compare.ResNet9()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in copy.state_dict().items()
    }
    copy.load_state_dict(ours.state_dict())
    ours.eval(), copy.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(copy(x), ours(x))
    torch.testing.assert_close(copy(x[0]), ours(x[:1])[0])  # one unbatched sample (dattri's vmap)
