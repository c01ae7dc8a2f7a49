"""Tests of the BatchedTrainer fast path for Linear/ReLU stacks (tdabench.groundtruth._fast_mlp).

Oracles: a plain per-model ``torch.optim.SGD`` loop on ``nn.Module`` copies in float64 over the
trainer's shared stream (independent of both batched code paths), and the generic
``vmap(grad(...))`` path (``fast_path=False``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdabench.errors import NonFiniteError
from tdabench.groundtruth._fast_mlp import FastStack, fast_plan
from tdabench.groundtruth.optim import normalize_recipe
from tdabench.groundtruth.trainer import BatchedTrainer, unstack

N, D, C, NT = 120, 12, 3, 20
F64 = dict(dtype=torch.float64, stream_seed=11)
ZERO_COL = 2  # an input column that is zero for every training sample


def _data(sparse: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    if sparse:  # like MNIST pixels: most inputs rarely non-zero (embedding_bag), a few often (GEMM)
        x[:, 3:] = torch.relu(x[:, 3:] - 1.0)
    x[:, ZERO_COL] = 0.0
    y = torch.randint(0, C, (N,), generator=g)
    xt = torch.randn(NT, D, generator=g)
    yt = torch.randint(0, C, (NT,), generator=g)
    return (x, y), (xt, yt)


@pytest.fixture(scope="module", params=[False, True], ids=["dense_x", "sparse_x"])
def data(request):
    return _data(request.param)


def lr_model():
    return nn.Linear(D, C)


def deep_relu():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(D, 8),
        nn.ReLU(),
        nn.Identity(),
        nn.Linear(8, 5),
        nn.ReLU(),
        nn.Linear(5, C),
    )


def nobias_relu():
    return nn.Sequential(
        nn.Linear(D, 6, bias=False), nn.ReLU(inplace=True), nn.Linear(6, C, bias=False)
    )


RECIPES = {
    "sgd": dict(optimizer="sgd", lr=0.2, epochs=3, batch_size=10),
    "momentum": dict(optimizer="sgd", lr=0.1, momentum=0.9, epochs=3, batch_size=10),
    "momentum_wd_sched": dict(
        optimizer="sgd",
        lr=0.1,
        momentum=0.8,
        weight_decay=1e-2,
        warmup_iters=3,
        lr_min=1e-3,
        epochs=3,
        batch_size=10,
    ),
    "wd": dict(optimizer="sgd", lr=0.1, weight_decay=1e-2, epochs=2, batch_size=10),
}


def half_masks(m, seed=1, k=N // 2):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g) < k for _ in range(m)])


def torch_loop(trainer, build, masks, seeds, b_stream):
    """Per-model torch.optim.SGD on nn.Module copies over the trainer's shared stream (float64)."""
    r = trainer.recipe
    x, y = trainer._train[0].double(), trainer._train[1]
    total = trainer.num_iters(b_stream)
    out = []
    for row, seed in zip(masks, seeds, strict=True):
        torch.manual_seed(seed)
        model = build().double()
        opt = torch.optim.SGD(
            model.parameters(), lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"]
        )
        for it, _, idx in trainer._stream(b_stream):
            sel = idx[row[idx]]
            if len(sel) == 0:
                continue
            from tdabench.groundtruth.optim import lr_at

            for gr in opt.param_groups:
                gr["lr"] = lr_at(r, it, total)
            opt.zero_grad()
            F.cross_entropy(model(x[sel]), y[sel]).backward()
            opt.step()
        out.append({k: v.detach() for k, v in model.state_dict().items()})
    return {k: torch.stack([o[k] for o in out]) for k in out[0]}


def max_abs(a, b):
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.parametrize("compact", [False, True], ids=["shared", "compact"])
@pytest.mark.parametrize(
    "build", [lr_model, deep_relu, nobias_relu], ids=["lr", "deep_relu", "nobias"]
)
@pytest.mark.parametrize("rname", list(RECIPES))
def test_fast_path_matches_torch_optim_and_generic_path(data, build, rname, compact):
    train, test = data
    masks, seeds = half_masks(5), [3, 1, 4, 1, 5]
    fast = BatchedTrainer(build, train, test, RECIPES[rname], compact=compact, **F64)
    assert fast.fast_path, fast.fast_path_reason
    generic = BatchedTrainer(
        build, train, test, RECIPES[rname], compact=compact, fast_path=False, **F64
    )
    assert not generic.fast_path and "disabled" in generic.fast_path_reason
    a = fast.train(masks, seeds)
    oracle = torch_loop(fast, build, masks, seeds, fast.stream_batch_size(masks))
    assert max_abs(a, oracle) <= 1e-10
    assert max_abs(a, generic.train(masks, seeds)) <= 1e-10
    # the parameters moved, and the zero input column did only under weight decay
    torch.manual_seed(seeds[0])
    init = build().double().state_dict()
    assert max((a[k][0] - init[k]).abs().max().item() for k in init) > 1e-3
    w0 = next(k for k in init if k.endswith("weight"))
    moved = (a[w0][0][:, ZERO_COL] - init[w0][:, ZERO_COL]).abs().max().item()
    assert (moved > 0) if RECIPES[rname].get("weight_decay") else (moved == 0)


@pytest.mark.parametrize("compact", [False, True], ids=["shared", "compact"])
def test_fast_path_skips_empty_batches(compact):
    """Tiny subsets and a fixed stream batch: many batches without members for some models
    (momentum buffers and weights must then stay as they are)."""
    train, test = _data(sparse=True)
    g = torch.Generator().manual_seed(5)
    masks = torch.stack([torch.randperm(N, generator=g) < 6 for _ in range(4)])
    recipe = RECIPES["momentum_wd_sched"]
    for build in (lr_model, deep_relu):
        fast = BatchedTrainer(
            build, train, test, recipe, stream_batch="fixed", compact=compact, **F64
        )
        assert fast.fast_path
        n_empty = sum(int(not masks[0, idx].any()) for _, _, idx in fast._stream(10))
        assert n_empty > 5
        a = fast.train(masks, [0, 1, 2, 3])
        assert max_abs(a, torch_loop(fast, build, masks, [0, 1, 2, 3], 10)) <= 1e-10


def test_sparse_and_dense_first_layer_are_chosen_by_density():
    recipe = normalize_recipe(RECIPES["sgd"])
    layers, reason = fast_plan(lr_model(), recipe, "classification", 1, False)
    assert layers is not None and reason == "nn.Linear"
    params = {
        "weight": torch.zeros(2, C, D, dtype=torch.float64),
        "bias": torch.zeros(2, C, dtype=torch.float64),
    }
    for sparse in (False, True):
        x = _data(sparse)[0][0].double()
        st = FastStack(layers, params, x, recipe, compact=False)
        assert st.sparse == sparse
        # bias row + the often non-zero inputs (columns 0 and 1; column 2 is always zero)
        assert st.n_dense == (1 + 2 if sparse else D)
        stc = FastStack(layers, params, x, recipe, compact=True)
        assert (stc.sparse, stc.n_dense) == (st.sparse, st.n_dense)
    st = FastStack(layers, params, x, recipe, compact=False)
    assert len(st.kept) == D - 1 and ZERO_COL not in st.kept.tolist()  # the zero column is dropped
    wd = normalize_recipe(RECIPES["wd"])
    assert (
        len(FastStack(layers, params, x, wd, compact=False).kept) == D
    )  # ... but not under weight decay


class _MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize(
    "build,recipe,kw,why",
    [
        (
            lambda: nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)),
            RECIPES["sgd"],
            {},
            "Tanh",
        ),
        (
            lambda: nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, C)),
            RECIPES["sgd"],
            {},
            "Dropout",
        ),
        (lr_model, dict(optimizer="adam", lr=0.01, epochs=1, batch_size=10), {}, "adam"),
        (lr_model, dict(RECIPES["sgd"], grad_clip=1.0), {}, "grad_clip"),
        (
            lambda: nn.Sequential(nn.ReLU(), nn.Linear(D, C)),
            RECIPES["sgd"],
            {},
            "ReLU not directly after",
        ),
        (
            lambda: nn.Sequential(nn.Linear(D, C), nn.ReLU()),
            RECIPES["sgd"],
            {},
            "last layer is a ReLU",
        ),
        (lr_model, RECIPES["sgd"], dict(fast_path=False), "disabled"),
        (lambda: _MyLinear(D, C), RECIPES["sgd"], {}, "not a plain nn.Linear"),
        (
            lambda: nn.Sequential(nn.Linear(D, C), nn.Flatten()),
            RECIPES["sgd"],
            dict(as_3d=True),
            "without nn.Flatten",
        ),
    ],
    ids=[
        "tanh",
        "dropout",
        "adam",
        "grad_clip",
        "relu_first",
        "relu_last",
        "disabled",
        "linear_subclass",
        "3d_input",
    ],
)
def test_fallback_to_generic_path(build, recipe, kw, why):
    train, test = _data(sparse=False)
    if kw.pop("as_3d", False):  # (n, 1, D): nn.Linear acts on the last dimension
        train, test = (train[0].unsqueeze(1), train[1]), (test[0].unsqueeze(1), test[1])
    tr = BatchedTrainer(build, train, test, recipe, **F64, **kw)
    assert not tr.fast_path
    assert why in tr.fast_path_reason
    masks = half_masks(2)
    out = tr.train(masks, [0, 1])  # the generic path still trains
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("compact", [False, True], ids=["shared", "compact"])
def test_fast_path_epoch_snapshots_equal_truncated_runs(compact):
    train, test = _data(sparse=True)
    masks, seeds = half_masks(3, seed=5), [7, 8, 9]
    recipe = dict(RECIPES["momentum"], epochs=3)
    seen = {}

    def on_epoch(epoch, rows, stacked):
        for i, r in enumerate(rows):
            assert (epoch, r) not in seen
            seen[(epoch, r)] = unstack(stacked, i)

    tr = BatchedTrainer(
        deep_relu, train, test, recipe, compact=compact, max_models_per_batch=2, **F64
    )
    assert tr.fast_path
    final = tr.train(masks, seeds, on_epoch=on_epoch)
    assert sorted(seen) == [(e, r) for e in (1, 2, 3) for r in range(3)]
    for e in (1, 2):
        short = BatchedTrainer(
            deep_relu, train, test, dict(recipe, epochs=e), compact=compact, **F64
        ).train(masks, seeds)
        for r in range(3):
            assert max_abs(seen[(e, r)], unstack(short, r)) <= 1e-12
    for r in range(3):
        assert max_abs(seen[(3, r)], unstack(final, r)) == 0.0
    assert max_abs(seen[(1, 0)], seen[(3, 0)]) > 1e-6  # snapshots are copies


@pytest.mark.parametrize("compact", [False, True], ids=["shared", "compact"])
@pytest.mark.parametrize("build", [lr_model, deep_relu], ids=["lr", "deep_relu"])
def test_fast_path_names_the_diverged_rows(build, compact):
    """Same NonFiniteError (rows and epoch) as the generic path; clean rows train fine."""
    (x, y), test = _data(sparse=False)
    x = x.clone()
    x[17] = 1e20  # finite outlier: float32 models trained on it overflow
    masks = torch.ones(4, N, dtype=torch.bool)
    masks[[0, 2], 17] = False  # rows 1 and 3 train on the outlier
    msgs = []
    for fast in (True, False):
        tr = BatchedTrainer(
            build, (x, y), test, RECIPES["momentum"], stream_seed=1, compact=compact, fast_path=fast
        )
        assert tr.fast_path == fast
        with pytest.raises(NonFiniteError, match=r"rows \[1(, 3)?\]") as err:
            tr.train(masks, [0, 1, 2, 3])
        msgs.append(str(err.value))
        ok = tr.train(masks[[0, 2]], [0, 2])
        assert all(torch.isfinite(v).all() for v in ok.values())
    assert msgs[0] == msgs[1]


def test_fast_path_float32_matches_generic_path():
    """float32 (the benchmark dtype): same results as the generic path up to float rounding."""
    train, test = _data(sparse=True)
    masks, seeds = half_masks(6), list(range(6))
    for build, compact in ((lr_model, False), (deep_relu, True)):
        kw = dict(stream_seed=3, compact=compact)
        a = BatchedTrainer(build, train, test, RECIPES["momentum"], **kw).train(masks, seeds)
        b = BatchedTrainer(build, train, test, RECIPES["momentum"], fast_path=False, **kw).train(
            masks, seeds
        )
        assert max_abs(a, b) <= 1e-4


def test_fast_path_flattens_image_inputs():
    (x, y), (xt, yt) = _data(sparse=True)
    train, test = (x.view(N, 1, 3, 4), y), (xt.view(NT, 1, 3, 4), yt)

    def build():
        return nn.Sequential(
            nn.Identity(), nn.Flatten(), nn.Linear(D, 6), nn.ReLU(), nn.Linear(6, C)
        )

    masks, seeds = half_masks(3), [0, 1, 2]
    for compact in (False, True):
        fast = BatchedTrainer(build, train, test, RECIPES["momentum"], compact=compact, **F64)
        assert fast.fast_path
        generic = BatchedTrainer(
            build, train, test, RECIPES["momentum"], compact=compact, fast_path=False, **F64
        )
        assert max_abs(fast.train(masks, seeds), generic.train(masks, seeds)) <= 1e-10


@pytest.mark.parametrize("compact", [False, True], ids=["shared", "compact"])
@pytest.mark.parametrize("which", ["logreg", "mlp_no_dropout"])
def test_benchmark_models_declare_their_stack(which, compact):
    """The project's own benchmark models (a flatten in forward, named submodules) take the fast
    path through ``linear_relu_stack()`` and train like the generic path and a torch.optim loop;
    the MLP with dropout on declines it."""
    from tdabench.benchmark.models import MLP, LogisticRegression

    def build():
        if which == "logreg":
            return LogisticRegression(D, C)
        return MLP(D, hidden=(8, 5), num_classes=C, dropout=0.0)

    train, test = _data(sparse=True)
    train = (train[0].view(N, 1, D), train[1])  # image-shaped: the model flattens it itself
    test = (test[0].view(NT, 1, D), test[1])
    masks, seeds = half_masks(4), [2, 7, 1, 8]
    recipe = RECIPES["momentum"]
    fast = BatchedTrainer(build, train, test, recipe, compact=compact, **F64)
    assert fast.fast_path, fast.fast_path_reason
    generic = BatchedTrainer(build, train, test, recipe, compact=compact, fast_path=False, **F64)
    a = fast.train(masks, seeds)
    assert max_abs(a, generic.train(masks, seeds)) <= 1e-10
    assert max_abs(a, torch_loop(fast, build, masks, seeds, fast.stream_batch_size(masks))) <= 1e-10
    dropout = BatchedTrainer(
        lambda: MLP(D, hidden=(8,), num_classes=C, dropout=0.1), train, test, recipe, **F64
    )
    assert not dropout.fast_path and "declined" in dropout.fast_path_reason
