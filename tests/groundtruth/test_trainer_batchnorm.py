"""Batched training of models with BatchNorm, the memory planner in the trainers, bf16 autocast.

Oracles: the sequential trainer (``torch.nn.BatchNorm`` in place, torch.optim, each model on
its own members of every stream batch) in float64, to 1e-10 relative; ``BatchNorm`` applied to
the members alone; counts of non-empty stream batches for ``num_batches_tracked``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tdabench.benchmark.models import ResNet9
from tdabench.errors import ConfigError
from tdabench.groundtruth._vmap_batchnorm import BatchNormContext, patch_batch_norm_layers
from tdabench.groundtruth.optim import normalize_recipe
from tdabench.groundtruth.trainer import BatchedTrainer, SequentialTrainer, make_trainer, unstack

N, NT = 64, 12
F64 = dict(dtype=torch.float64, stream_seed=3)
RECIPES = {
    "sgd_momentum_wd": dict(
        optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, epochs=2, batch_size=8
    ),
    "adam": dict(optimizer="adam", lr=0.01, weight_decay=1e-3, epochs=2, batch_size=8),
}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return (
        (torch.randn(N, 2, 6, 6, generator=g), torch.randint(0, 3, (N,), generator=g)),
        (torch.randn(NT, 2, 6, 6, generator=g), torch.randint(0, 3, (NT,), generator=g)),
    )


def conv_bn():
    """Conv-BN net with every BatchNorm flavour: 2d, cumulative (momentum None), 1d, no stats."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.BatchNorm1d(6, affine=False, track_running_stats=False),
        nn.Linear(6, 3),
    )


def conv_bn2d():
    """Only 2d batch norm: a stream batch with a single member still has 6 x 6 values per
    channel (torch's BatchNorm1d refuses one value per channel in training)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1),
        nn.BatchNorm2d(3, momentum=None),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def tiny_resnet9():
    return ResNet9(num_classes=3, widths=(4, 4, 8, 8), in_channels=2, dropout=0.0)


def masks_of(m, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g) < size for _ in range(m)])


def rel_err(a, b):
    return max(
        (
            (a[k].double() - b[k].double()).abs().max()
            / b[k].double().abs().max().clamp(min=1e-300)
        ).item()
        for k in b
    )


@pytest.mark.parametrize("compact", [False, True], ids=["shared", "compact"])
@pytest.mark.parametrize("rname", list(RECIPES))
def test_batched_batchnorm_equals_sequential(images, rname, compact):
    train, test = images
    masks, seeds = masks_of(3, N // 2), [5, 6, 7]
    seq = SequentialTrainer(conv_bn, train, test, RECIPES[rname], **F64)
    bat = BatchedTrainer(conv_bn, train, test, RECIPES[rname], compact=compact, **F64)
    a, b = seq.train(masks, seeds), bat.train(masks, seeds)
    assert set(a) == set(b) == set(conv_bn().state_dict())
    assert rel_err(b, a) <= 1e-10
    assert torch.equal(b["1.num_batches_tracked"], a["1.num_batches_tracked"])
    # the running statistics moved, and differ between models (their own members only)
    assert (a["1.running_var"] - 1).abs().max() > 1e-2
    assert (a["4.running_mean"][0] - a["4.running_mean"][1]).abs().max() > 1e-6
    torch.testing.assert_close(
        bat.evaluate(b, "loss"), seq.evaluate(a, "loss"), rtol=1e-10, atol=1e-12
    )


def test_empty_batches_leave_running_statistics_unchanged(images):
    """Tiny subsets with a fixed stream batch: many stream batches hold no member of a model;
    its step and its running-statistics update are skipped, as in the sequential trainer."""
    train, test = images
    masks = masks_of(3, 5, seed=4)
    kw = dict(stream_batch="fixed", **F64)
    recipe = RECIPES["sgd_momentum_wd"]
    seq = SequentialTrainer(conv_bn2d, train, test, recipe, **kw)
    for compact in (False, True):
        bat = BatchedTrainer(conv_bn2d, train, test, recipe, compact=compact, **kw)
        a, b = seq.train(masks, [0, 1, 2]), bat.train(masks, [0, 1, 2])
        assert rel_err(b, a) <= 1e-10
        for r in range(3):  # independent oracle: one running-statistics update per non-empty batch
            steps = sum(int(masks[r, idx].any()) for _, _, idx in seq._stream(8))
            assert steps < 2 * N // 8
            assert int(b["1.num_batches_tracked"][r]) == int(b["4.num_batches_tracked"][r]) == steps


def test_non_members_never_enter_batch_statistics(images):
    """Changing the inputs of samples outside every mask changes nothing (they share the
    stream batches, and the compact padding, with the members)."""
    train, test = images
    masks = masks_of(2, N // 2)
    masks[:, :8] = False  # samples 0..7 belong to no model
    poisoned = (train[0].clone(), train[1])
    poisoned[0][:8] = 1e3 * torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(9))
    for compact in (False, True):
        kw = dict(compact=compact, stream_batch=16, **F64)
        clean = BatchedTrainer(conv_bn, train, test, RECIPES["adam"], **kw).train(masks, [1, 2])
        dirty = BatchedTrainer(conv_bn, poisoned, test, RECIPES["adam"], **kw).train(masks, [1, 2])
        assert rel_err(dirty, clean) <= 1e-12


def test_masked_forward_equals_batchnorm_on_members():
    g = torch.Generator().manual_seed(2)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
    patched = nn.BatchNorm2d(3).double()
    patched.load_state_dict(bn.state_dict())
    ctx = BatchNormContext()
    assert patch_batch_norm_layers(patched, ctx) == [""]
    x = torch.randn(7, 3, 4, 4, generator=g, dtype=torch.float64)
    w = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.float64)
    ctx.begin(w)
    y = patched(x)
    upd = ctx.end()
    ref = bn(x[w.bool()])  # in place update of bn's running statistics
    torch.testing.assert_close(y[w.bool()], ref, rtol=1e-13, atol=1e-13)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(upd[k], getattr(bn, k), rtol=1e-13, atol=1e-15)
    assert torch.isfinite(y).all()
    # the patched layer never updates its own buffers; outside a training call it is plain BatchNorm
    assert int(patched.num_batches_tracked) == 0
    patched.load_state_dict({**patched.state_dict(), **upd})
    patched.eval()
    bn.eval()
    torch.testing.assert_close(patched(x), bn(x))


def test_tiny_resnet9_batched_equals_sequential_with_snapshots(images):
    train, test = images
    masks, seeds = masks_of(2, N // 2, seed=7), [3, 4]
    recipe = dict(RECIPES["sgd_momentum_wd"], epochs=2)
    seen: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def on_epoch(epoch, rows, stacked):
        for i, r in enumerate(rows):
            seen[(epoch, r)] = unstack(stacked, i)

    seq = SequentialTrainer(tiny_resnet9, train, test, recipe, **F64).train(masks, seeds)
    bat = BatchedTrainer(tiny_resnet9, train, test, recipe, max_models_per_batch=1, **F64)
    b = bat.train(masks, seeds, on_epoch=on_epoch)
    assert rel_err(b, seq) <= 1e-10
    assert sorted(seen) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    one_epoch = SequentialTrainer(tiny_resnet9, train, test, dict(recipe, epochs=1), **F64).train(
        masks, seeds
    )
    for r in range(2):
        assert rel_err(seen[(1, r)], unstack(one_epoch, r)) <= 1e-10
        assert rel_err(seen[(2, r)], unstack(seq, r)) <= 1e-10


def test_make_trainer_trains_batchnorm_batched(images):
    train, test = images
    setting = SimpleNamespace(
        name="toy_bn", kind="classification", recipe=RECIPES["adam"], build_model=conv_bn
    )
    bench = SimpleNamespace(train=train, test=test, meta={"source": "toy"})
    assert isinstance(make_trainer(setting, bench, batched=True), BatchedTrainer)


def test_planner_sizes_chunks_without_changing_numbers(images):
    """A budget that fits one model trains and evaluates one model at a time; a large one all
    at once; the numbers agree (the stream is shared)."""
    train, test = images
    masks, seeds = masks_of(3, N // 2, seed=2), [0, 1, 2]
    recipe = RECIPES["adam"]
    small = BatchedTrainer(conv_bn2d, train, test, recipe, memory_budget=1, **F64)
    large = BatchedTrainer(conv_bn2d, train, test, recipe, memory_budget="4GiB", **F64)
    b_stream = small.stream_batch_size(masks)
    assert small.models_per_chunk(3, b_stream) == 1 and large.models_per_chunk(3, b_stream) == 3
    assert small._eval_chunks(3) == (1, 1) and large._eval_chunks(3) == (3, NT)
    # the per-model estimate grows with the stream batch (activations are measured, not guessed)
    per = small._param_bytes() * 5 + 2 * small.sample_bytes() * b_stream
    just = BatchedTrainer(conv_bn2d, train, test, recipe, memory_budget=2 * (2 * per) + 1, **F64)
    assert just.models_per_chunk(3, b_stream) == 2 and just.models_per_chunk(3, 4 * b_stream) == 1
    a, b = small.train(masks, seeds), large.train(masks, seeds)
    assert rel_err(a, b) <= 1e-12
    torch.testing.assert_close(
        small.evaluate(a, "margin"), large.evaluate(a, "margin"), rtol=1e-12, atol=1e-12
    )
    seq = SequentialTrainer(
        conv_bn2d, train, test, recipe, memory_budget=1, eval_batch_size=5, **F64
    )
    torch.testing.assert_close(
        seq.evaluate(a, "margin"), large.evaluate(a, "margin"), rtol=1e-12, atol=1e-12
    )


def test_bf16_autocast_recipe(images):
    """bf16 autocast really runs in bf16 (the numbers move) and trains the same model up to
    bf16 rounding in both trainers; parameters stay in the trainer's dtype."""
    train, test = images
    masks, seeds = masks_of(2, N // 2, seed=3), [0, 1]
    recipe = RECIPES["sgd_momentum_wd"]
    with pytest.raises(ConfigError, match="autocast"):
        normalize_recipe(dict(recipe, autocast="fp8"))
    plain = BatchedTrainer(conv_bn2d, train, test, recipe, stream_seed=3)
    assert (
        "autocast" not in plain.fingerprint()["recipe"]
    )  # keys of existing ground truth unchanged
    ref = plain.evaluate(
        SequentialTrainer(conv_bn2d, train, test, recipe, stream_seed=3).train(masks, seeds), "loss"
    )
    for cls in (BatchedTrainer, SequentialTrainer):
        bf16 = cls(conv_bn2d, train, test, dict(recipe, autocast="bf16"), stream_seed=3)
        assert bf16.fingerprint()["recipe"]["autocast"] == "bf16"
        out = bf16.train(masks, seeds)
        assert all(v.dtype in (torch.float32, torch.int64) for v in out.values())
        diff = (plain.evaluate(out, "loss") - ref).abs().max()
        assert 1e-4 < diff < 0.05 * ref.abs().max()


def test_autocast_turns_the_fast_path_off():
    """The hand-written MLP passes have no autocast form: an autocast recipe takes the vmap path."""
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g))

    def mlp():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    recipe = dict(optimizer="sgd", lr=0.1, epochs=1, batch_size=8)
    assert BatchedTrainer(mlp, train, train, recipe).fast_path
    tr = BatchedTrainer(mlp, train, train, dict(recipe, autocast="bf16"))
    assert not tr.fast_path and "autocast" in tr.fast_path_reason
