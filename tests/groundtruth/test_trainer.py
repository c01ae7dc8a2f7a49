"""Tests of the retraining trainers and the functional optimisers.

Oracles: torch.optim on plain nn.Modules (optimisers, sequential trainer), the sequential
trainer for the batched one (float64, <= 1e-8 relative), brute-force loops for targets.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdabench.errors import ConfigError, DataError, NonFiniteError, ShapeError
from tdabench.groundtruth.optim import (
    FunctionalOptimizer,
    clip_grad_norms_,
    lr_at,
    make_torch_optimizer,
    normalize_recipe,
)
from tdabench.groundtruth.trainer import (
    TRAINER_VERSION,
    BatchedTrainer,
    SequentialTrainer,
    Trainer,
    make_trainer,
    unstack,
)

N, D, C, NT = 120, 6, 3, 30
F64 = dict(dtype=torch.float64, stream_seed=11)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    xt = torch.randn(NT, D, generator=g)
    yt = torch.randint(0, C, (NT,), generator=g)
    return (x, y), (xt, yt)


def lr_model():
    return nn.Linear(D, C)


def mlp_model():
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))


def half_masks(m, seed=1, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) < n // 2 for _ in range(m)])


def rel_err(a, b):
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-300)).item() for k in b)


RECIPES = {
    "sgd_momentum": dict(
        optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, epochs=3, batch_size=10
    ),
    "adam": dict(optimizer="adam", lr=0.02, weight_decay=1e-3, epochs=3, batch_size=10),
    "adamw_sched_clip": dict(
        optimizer="adamw",
        lr=0.02,
        weight_decay=0.1,
        warmup_iters=4,
        lr_min=1e-3,
        grad_clip=0.3,
        epochs=2,
        batch_size=10,
    ),
}


@pytest.mark.parametrize("compact", [False, True], ids=["shared", "compact"])
@pytest.mark.parametrize("build", [lr_model, mlp_model], ids=["lr", "mlp"])
@pytest.mark.parametrize("rname", list(RECIPES))
def test_batched_matches_sequential(data, build, rname, compact):
    train, test = data
    masks, seeds = half_masks(5), [3, 1, 4, 1, 5]
    seq = SequentialTrainer(build, train, test, RECIPES[rname], **F64)
    bat = BatchedTrainer(build, train, test, RECIPES[rname], compact=compact, **F64)
    a, b = seq.train(masks, seeds), bat.train(masks, seeds)
    assert set(a) == set(b) == set(build().state_dict())
    assert rel_err(b, a) <= 1e-8
    # training actually moved the parameters away from the initialisation
    torch.manual_seed(seeds[0])
    init = build().double().state_dict()
    assert max((a[k][0] - init[k]).abs().max().item() for k in init) > 1e-3
    for target in ("loss", "margin", "neg_loss"):
        torch.testing.assert_close(
            bat.evaluate(b, target), seq.evaluate(a, target), rtol=1e-8, atol=1e-10
        )


def test_sequential_equals_plain_torch_loop(data):
    """Independent oracle for the semantics: a hand-written torch.optim loop over the stream."""
    train, test = data
    recipe = RECIPES["sgd_momentum"]
    masks = half_masks(1)
    seq = SequentialTrainer(lr_model, train, test, recipe, **F64)
    b_stream = seq.stream_batch_size(masks)
    assert b_stream == 20  # scaled: round(10 * 120 / 60)
    torch.manual_seed(7)
    model = lr_model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = train[0].double(), train[1]
    steps = 0
    for _, _, idx in seq._stream(b_stream):
        sel = idx[masks[0, idx]]
        if len(sel) == 0:
            continue
        opt.zero_grad()
        F.cross_entropy(model(x[sel]), y[sel]).backward()
        opt.step()
        steps += 1
    assert seq.num_iters(b_stream) == 3 * math.ceil(N / 20)
    out = seq.train(masks, [7])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(out[k][0], v, rtol=0, atol=0)


def test_stream_is_a_permutation_per_epoch(data):
    train, test = data
    tr = SequentialTrainer(lr_model, train, test, dict(lr=0.1, epochs=2, batch_size=7), **F64)
    batches = list(tr._stream(7))
    assert len(batches) == 2 * math.ceil(N / 7)
    for e in range(2):
        idx = torch.cat([b for _, ep, b in batches if ep == e])
        assert sorted(idx.tolist()) == list(range(N))
    # different epochs and different stream seeds give different orders
    assert not torch.equal(batches[0][2], batches[len(batches) // 2][2])
    other = SequentialTrainer(
        lr_model,
        train,
        test,
        dict(lr=0.1, epochs=2, batch_size=7),
        dtype=torch.float64,
        stream_seed=12,
    )
    assert not torch.equal(next(other._stream(7))[2], batches[0][2])


def test_chunking_and_grouping_do_not_change_results(data):
    train, test = data
    recipe = RECIPES["adam"]
    masks, seeds = half_masks(5), [10, 11, 12, 13, 14]
    full = BatchedTrainer(mlp_model, train, test, recipe, compact=True, **F64).train(masks, seeds)
    chunked = BatchedTrainer(
        mlp_model, train, test, recipe, max_models_per_batch=2, compact=True, **F64
    ).train(masks, seeds)
    alone = BatchedTrainer(mlp_model, train, test, recipe, **F64).train(masks[3:4], seeds[3:4])
    for k in full:
        torch.testing.assert_close(chunked[k], full[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(alone[k][0], full[k][3], rtol=1e-12, atol=1e-14)
    # deterministic: same call, same bits
    again = BatchedTrainer(mlp_model, train, test, recipe, compact=True, **F64).train(masks, seeds)
    assert all(torch.equal(again[k], full[k]) for k in full)


def test_empty_stream_batches_skip_the_step(data):
    """Tiny subsets and a fixed stream batch force batches without members."""
    train, test = data
    g = torch.Generator().manual_seed(5)
    masks = torch.stack([torch.randperm(N, generator=g) < 6 for _ in range(4)])
    for rname in ("sgd_momentum", "adam"):
        kw = dict(stream_batch="fixed", **F64)
        seq = SequentialTrainer(lr_model, train, test, RECIPES[rname], **kw)
        bat = BatchedTrainer(lr_model, train, test, RECIPES[rname], **kw)
        n_empty = sum(int(not masks[0, idx].any()) for _, _, idx in seq._stream(10))
        assert n_empty > 5
        assert rel_err(bat.train(masks, [0, 1, 2, 3]), seq.train(masks, [0, 1, 2, 3])) <= 1e-8


@pytest.mark.parametrize("kind", ["sgd", "sgd_wd", "adam", "adamw"])
def test_functional_optimizer_matches_torch_optim_with_skips(kind):
    recipe = {
        "sgd": dict(optimizer="sgd", lr=0.1, momentum=0.9),
        "sgd_wd": dict(optimizer="sgd", lr=0.1, weight_decay=0.01),
        "adam": dict(optimizer="adam", lr=0.05, weight_decay=0.01, betas=[0.8, 0.95]),
        "adamw": dict(optimizer="adamw", lr=0.05, weight_decay=0.1),
    }[kind]
    recipe = normalize_recipe(dict(recipe, epochs=1, batch_size=1))
    g = torch.Generator().manual_seed(0)
    m, steps = 3, 6
    p0 = {
        "w": torch.randn(m, 4, 2, generator=g, dtype=torch.float64),
        "b": torch.randn(m, 2, generator=g, dtype=torch.float64),
    }
    grads = [
        {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in p0.items()}
        for _ in range(steps)
    ]
    active = torch.rand(steps, m, generator=g) < 0.6
    active[0] = True
    active[2, 1] = False
    params = {k: v.clone() for k, v in p0.items()}
    fo = FunctionalOptimizer(recipe)
    state = fo.init(params)
    for t in range(steps):
        lr = 0.1 * (t + 1)
        fo.step(
            params,
            {k: v.clone() for k, v in grads[t].items()},
            state,
            lr,
            None if bool(active[t].all()) else active[t],
        )
    for r in range(m):
        ref = {k: v[r].clone().requires_grad_(True) for k, v in p0.items()}
        opt = make_torch_optimizer(recipe, list(ref.values()))
        for t in range(steps):
            if not active[t, r]:
                continue
            for gp in opt.param_groups:
                gp["lr"] = 0.1 * (t + 1)
            for k, v in ref.items():
                v.grad = grads[t][k][r].clone()
            opt.step()
        for k in ref:
            torch.testing.assert_close(params[k][r], ref[k].detach(), rtol=1e-12, atol=1e-14)


def test_clip_grad_norms_matches_torch():
    g = torch.Generator().manual_seed(0)
    grads = {
        "a": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "b": torch.randn(3, 2, 2, generator=g, dtype=torch.float64),
    }
    grads["a"][1] *= 1e-3  # model 1 below the threshold: unchanged
    ref = {k: v.clone() for k, v in grads.items()}
    clip_grad_norms_(grads, 1.0)
    for r in range(3):
        ps = [torch.zeros(ref[k][r].shape, dtype=torch.float64, requires_grad=True) for k in ref]
        for p, k in zip(ps, ref, strict=True):
            p.grad = ref[k][r].clone()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        for p, k in zip(ps, ref, strict=True):
            torch.testing.assert_close(grads[k][r], p.grad, rtol=1e-14, atol=0)


def test_lr_schedule():
    r = normalize_recipe(dict(lr=1.0, epochs=1, batch_size=1, warmup_iters=4, lr_min=0.1))
    assert [lr_at(r, i, 14) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(r, 4, 14) == 1.0
    assert lr_at(r, 9, 14) == pytest.approx(0.55)
    assert lr_at(r, 14, 14) == pytest.approx(0.1)
    const = normalize_recipe(dict(lr=0.3, epochs=1, batch_size=1))
    assert all(lr_at(const, i, 10) == 0.3 for i in range(10))


def test_targets_against_brute_force(data):
    train, test = data
    bat = BatchedTrainer(mlp_model, train, test, RECIPES["sgd_momentum"], **F64)
    stacked = bat.train(half_masks(3), [0, 1, 2])
    xt, yt = test[0].double(), test[1]
    loss, margin, neg = (bat.evaluate(stacked, t) for t in ("loss", "margin", "neg_loss"))
    assert loss.shape == (3, NT)
    for r in range(3):
        model = mlp_model().double()
        model.load_state_dict(unstack(stacked, r))
        with torch.no_grad():
            logits = model(xt)
        for j in range(NT):
            lj, yj = logits[j], int(yt[j])
            ce = -torch.log_softmax(lj, 0)[yj]
            others = torch.cat([lj[:yj], lj[yj + 1 :]])
            assert loss[r, j].item() == pytest.approx(ce.item(), rel=1e-10)
            assert margin[r, j].item() == pytest.approx(
                (lj[yj] - torch.logsumexp(others, 0)).item(), rel=1e-10
            )
        torch.testing.assert_close(neg, -loss)

    template = mlp_model().double()

    def target(params, batch):
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(template, params, (x,)), y)

    torch.testing.assert_close(bat.evaluate(stacked, target), loss, rtol=1e-10, atol=1e-12)


class TinyLM(nn.Module):
    def __init__(self, vocab=7, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = torch.cumsum(self.emb(ids), dim=1)  # causal mixing
        return self.head(torch.tanh(h)), None  # tuple output: logits first


def test_sequence_kind(data):
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(0, 7, (40, 6), generator=g)
    train = (seqs[:30, :-1], seqs[:30, 1:])
    test = (seqs[30:, :-1], seqs[30:, 1:])
    recipe = dict(optimizer="adam", lr=0.05, betas=[0.9, 0.98], max_iters=12, batch_size=4)
    masks = torch.stack([torch.randperm(30, generator=g) < 15 for _ in range(3)])
    kw = dict(kind="sequence", **F64)
    seq = SequentialTrainer(TinyLM, train, test, recipe, **kw)
    bat = BatchedTrainer(TinyLM, train, test, recipe, **kw)
    assert seq.num_iters(seq.stream_batch_size(masks)) == 12
    a, b = seq.train(masks, [0, 1, 2]), bat.train(masks, [0, 1, 2])
    assert rel_err(b, a) <= 1e-8
    loss = bat.evaluate(b, "loss")
    model = TinyLM().double()
    model.load_state_dict(unstack(b, 2))
    with torch.no_grad():
        logits = model(test[0])[0]
    ref = F.cross_entropy(logits.transpose(1, 2), test[1], reduction="none").mean(1)
    torch.testing.assert_close(loss[2], ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bat.evaluate(b, "neg_loss"), -loss)
    assert bat.evaluate(b, "margin").shape == (3, 10)


def test_nonfinite_names_the_diverged_rows(data):
    (x, y), test = data
    bad = x.clone()
    bad[17, 0] = float("nan")
    with pytest.raises(DataError, match=r"train samples \[17\]"):
        BatchedTrainer(lr_model, (bad, y), test, RECIPES["adam"])
    x = x.clone()
    x[17] = 1e20  # finite outlier: float32 models trained on it overflow in the second epoch
    masks = torch.ones(4, N, dtype=torch.bool)
    masks[[0, 2], 17] = False  # rows 1 and 3 train on the outlier
    for cls in (SequentialTrainer, BatchedTrainer):
        tr = cls(lr_model, (x, y), test, RECIPES["sgd_momentum"], stream_seed=1)
        with pytest.raises(
            NonFiniteError, match=r"rows \[1, 3\]" if cls is BatchedTrainer else r"rows \[1\]"
        ):
            tr.train(masks, [0, 1, 2, 3])
        ok = tr.train(masks[[0, 2]], [0, 2])  # the clean rows train fine
        assert all(torch.isfinite(v).all() for v in ok.values())


def test_bad_inputs(data):
    train, test = data
    tr = BatchedTrainer(lr_model, train, test, RECIPES["adam"], **F64)
    with pytest.raises(ShapeError, match="n_train=120"):
        tr.train(torch.ones(2, N - 1, dtype=torch.bool), [0, 1])
    with pytest.raises(ShapeError):
        tr.train(torch.ones(N, dtype=torch.bool), [0])
    with pytest.raises(ConfigError, match="bool"):
        tr.train(torch.ones(2, N), [0, 1])
    with pytest.raises(ShapeError, match="one seed per model"):
        tr.train(torch.ones(2, N, dtype=torch.bool), [0])
    empty = torch.ones(2, N, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ConfigError, match=r"rows \[1\]"):
        tr.train(empty, [0, 1])
    mixed = half_masks(2)
    mixed[1] = True
    with pytest.raises(ConfigError, match="stream_batch"):
        tr.train(mixed, [0, 1])
    with pytest.raises(ConfigError, match="unknown recipe keys"):
        BatchedTrainer(lr_model, train, test, dict(RECIPES["adam"], momentun=0.9))
    with pytest.raises(ConfigError, match="target"):
        tr.evaluate(tr.train(half_masks(1), [0]), "accuracy")
    with pytest.raises(ShapeError):
        BatchedTrainer(lr_model, (train[0][:5], train[1]), test, RECIPES["adam"])


def test_instance_norm_statistics_fall_back_to_sequential(data):
    """Running statistics other than BatchNorm (batch norm itself trains batched, see
    test_trainer_batchnorm.py) are refused by the batched trainer and make_trainer falls back."""
    train, test = data

    def in_model():
        return nn.Sequential(
            nn.Linear(D, 8),
            nn.Unflatten(1, (2, 4)),
            nn.InstanceNorm1d(2, track_running_stats=True),
            nn.Flatten(),
            nn.Linear(8, C),
        )

    with pytest.raises(ConfigError, match="SequentialTrainer"):
        BatchedTrainer(in_model, train, test, RECIPES["sgd_momentum"])
    setting = SimpleNamespace(
        name="toy_in", kind="classification", recipe=RECIPES["sgd_momentum"], build_model=in_model
    )
    bench = SimpleNamespace(train=train, test=test, meta={"source": "toy"})
    tr = make_trainer(setting, bench, batched=True, max_models_per_batch=4)
    assert isinstance(tr, SequentialTrainer) and isinstance(tr, Trainer)
    out = tr.train(half_masks(2), [0, 1])
    assert out["2.running_mean"].shape == (2, 2)
    assert tr.evaluate(out, "loss").shape == (2, NT)


def test_make_trainer_and_fingerprint(data):
    train, test = data
    setting = SimpleNamespace(
        name="toy_mlp", kind="classification", recipe=RECIPES["adam"], build_model=mlp_model
    )
    bench = SimpleNamespace(train=train, test=test, meta={"source": "toy", "seed": 0})
    rng_before = torch.get_rng_state()
    tr = make_trainer(setting, bench, batched=True, stream_seed=5)
    assert isinstance(tr, BatchedTrainer)
    tr.train(half_masks(2), [0, 1])
    assert torch.equal(torch.get_rng_state(), rng_before)  # trainers never leak RNG state
    fp = tr.fingerprint()
    json.dumps(fp)
    assert fp["trainer"] == "batched" and fp["trainer_version"] == TRAINER_VERSION
    assert fp["setting"] == "toy_mlp" and fp["stream_seed"] == 5 and fp["stream_batch"] == "scaled"
    assert fp["model"]["params"]["0.weight"] == [8, D] and fp["data"]["meta"]["source"] == "toy"
    assert fp["recipe"]["betas"] == [0.9, 0.999] and fp["dtype"] == "float32"
    seq = make_trainer(setting, bench, batched=False, stream_seed=5)
    assert seq.fingerprint()["trainer"] == "sequential"
    assert make_trainer(setting, bench, stream_seed=6).fingerprint()["stream_seed"] == 6
    changed = (train[0].clone(), train[1])
    changed[0][0, 0] += 1
    assert (
        make_trainer(
            setting, SimpleNamespace(train=changed, test=test, meta=None), stream_seed=5
        ).fingerprint()["data"]["sha256"]
        != fp["data"]["sha256"]
    )


def test_dropout_models_are_deterministic(data):
    train, test = data

    def drop_mlp():
        return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, C))

    masks = half_masks(3)
    a = BatchedTrainer(drop_mlp, train, test, RECIPES["sgd_momentum"], **F64).train(
        masks, [0, 1, 2]
    )
    b = BatchedTrainer(drop_mlp, train, test, RECIPES["sgd_momentum"], **F64).train(
        masks, [0, 1, 2]
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    s1 = SequentialTrainer(drop_mlp, train, test, RECIPES["sgd_momentum"], **F64).train(
        masks, [0, 1, 2]
    )
    s2 = SequentialTrainer(drop_mlp, train, test, RECIPES["sgd_momentum"], **F64).train(
        masks, [0, 1, 2]
    )
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    # the dropout masks differ between models inside vmap: identical masks and seeds give different models
    c = BatchedTrainer(drop_mlp, train, test, RECIPES["sgd_momentum"], **F64).train(
        masks[[0, 0]], [0, 0]
    )
    assert not torch.equal(c["0.weight"][0], c["0.weight"][1])


@pytest.mark.parametrize("width", [3, 60], ids=["gemm", "bmm"])
def test_stacked_linear_matches_linear_under_vmap(width):
    from tdabench.groundtruth._vmap_linear import GEMM_MAX_OUT, StackedLinear

    assert 3 <= GEMM_MAX_OUT < 60  # both branches of the vmap rule are exercised
    g = torch.Generator().manual_seed(0)
    m, B = 4, 5
    kw = dict(generator=g, dtype=torch.float64)
    x, xb = torch.randn(B, 7, **kw), torch.randn(m, B, 7, **kw)
    y = torch.randint(0, 3, (B,), generator=g)
    p = dict(
        W1=torch.randn(m, width, 7, **kw),
        b1=torch.randn(m, width, **kw),
        W2=torch.randn(m, 3, width, **kw),
        b2=torch.randn(m, 3, **kw),
    )
    shared_b = torch.randn(width, **kw)

    def loss(q, inp, lin, bias1):
        h = torch.tanh(lin(inp, q["W1"], q["b1"] if bias1 is None else bias1))
        return F.cross_entropy(lin(h, q["W2"], q["b2"]), y)

    for inp, dims in ((x, None), (xb, 0)):
        for bias1 in (None, shared_b):
            ref = torch.func.vmap(torch.func.grad(loss), in_dims=(0, dims, None, None))(
                p, inp, F.linear, bias1
            )
            got = torch.func.vmap(torch.func.grad(loss), in_dims=(0, dims, None, None))(
                p, inp, StackedLinear.apply, bias1
            )
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-14)
    # forward with a shared weight and batched input
    out = torch.func.vmap(StackedLinear.apply, in_dims=(0, None, None))(xb, p["W1"][0], p["b1"][0])
    torch.testing.assert_close(out, F.linear(xb, p["W1"][0], p["b1"][0]))


@pytest.mark.parametrize("cls", [SequentialTrainer, BatchedTrainer], ids=["sequential", "batched"])
@pytest.mark.parametrize("rname", ["sgd_momentum", "adam"])
def test_epoch_snapshots_equal_truncated_runs(data, cls, rname):
    """on_epoch snapshots of one run == separate runs with fewer epochs (constant lr), for
    every model and every epoch; the final snapshot equals the returned state."""
    train, test = data
    masks, seeds = half_masks(3, seed=5), [7, 8, 9]
    recipe = dict(RECIPES[rname], epochs=3)
    seen: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def on_epoch(epoch, rows, stacked):
        for i, r in enumerate(rows):
            assert (epoch, r) not in seen  # each (epoch, model) reported once
            seen[(epoch, r)] = unstack(stacked, i)

    extra = dict(max_models_per_batch=2) if cls is BatchedTrainer else {}
    final = cls(mlp_model, train, test, recipe, **F64, **extra).train(
        masks, seeds, on_epoch=on_epoch
    )
    assert sorted(seen) == [(e, r) for e in (1, 2, 3) for r in range(3)]
    for e in (1, 2):
        short = cls(mlp_model, train, test, dict(recipe, epochs=e), **F64).train(masks, seeds)
        for r in range(3):
            assert rel_err(seen[(e, r)], unstack(short, r)) <= 1e-12
    for r in range(3):
        assert rel_err(seen[(3, r)], unstack(final, r)) == 0.0
    # snapshots are copies: later training does not change them
    assert rel_err(seen[(1, 0)], seen[(3, 0)]) > 1e-6


def test_take_equals_advanced_indexing():
    from tdabench.groundtruth.trainer import _take

    t = torch.randn(9, 4, 3)
    for index in (
        torch.tensor([3, 0, 8, 3]),
        torch.tensor([[1, 2], [7, 0], [5, 5]]),
        torch.tensor([], dtype=torch.long),
    ):
        assert torch.equal(_take(t, index), t[index])
    labels = torch.arange(9)
    assert torch.equal(_take(labels, torch.tensor([[4, 1]])), labels[torch.tensor([[4, 1]])])


def test_compact_steps_use_plain_linear_and_match_fast_linear_off(data):
    train, test = data
    masks, seeds = half_masks(4), [3, 4, 5, 6]
    recipe = RECIPES["sgd_momentum"]
    fast = BatchedTrainer(mlp_model, train, test, recipe, compact=True, **F64)
    assert fast._compact_template is not fast._train_template
    assert all(
        type(m).forward is m.forward.__func__
        for m in fast._compact_template.modules()
        if isinstance(m, nn.Linear)
    )  # unpatched
    plain = BatchedTrainer(mlp_model, train, test, recipe, compact=True, fast_linear=False, **F64)
    a, b = fast.train(masks, seeds), plain.train(masks, seeds)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)
