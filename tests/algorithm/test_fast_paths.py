"""Speed paths of the gradient-feature attributors against float64 oracles: loaders replayed
across checkpoints, per-parameter gradient blocks, sparse (zero-column) gradients on a float32
model, and no checkpoint reloading per batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import GradDotAttributor, TracInAttributor, TRAKAttributor
from tdabench.algorithm.base import ReplayLoader
from tdabench.func.projection import make_projector
from tdabench.task import AttributionTask

N_IN, N_CLS, N_TRAIN, N_TEST = 64, 5, 40, 6  # weight block 320 columns: zero-column checks run


class Counting:
    """An iterable over a DataLoader that counts how often it is iterated."""

    def __init__(self, loader):
        self.loader = loader
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.loader)


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, N_IN, generator=g, dtype=torch.float64)
    x[:, torch.rand(N_IN, generator=g) < 0.4] = 0.0  # features zero everywhere (like MNIST borders)
    x[torch.rand(x.shape, generator=g) < 0.3] = 0.0  # and sparse elsewhere
    y = torch.randint(0, N_CLS, (N_TRAIN + N_TEST,), generator=g)
    x = x.to(dtype)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


def _task(num_ckpt=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(N_IN, N_CLS).to(dtype)
    g = torch.Generator().manual_seed(seed + 7)
    ckpts = [
        {
            k: (v.double() + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(dtype)
            for k, v in model.state_dict().items()
        }
        for _ in range(num_ckpt)
    ]

    def loss(params, data):
        return F.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    def margin(params, data):
        logp = torch.log_softmax(functional_call(model, params, (data[0],)), 1).gather(
            1, data[1][:, None]
        )[:, 0]
        return (logp - torch.log1p(-torch.exp(logp))).mean()

    def prob(params, data):
        return (
            torch.softmax(functional_call(model, params, (data[0],)), 1)
            .gather(1, data[1][:, None])[:, 0]
            .mean()
        )

    return AttributionTask(loss, model, ckpts, target_func=margin), ckpts, prob


def _grads64(ckpt, dataset, which):
    """Per-sample gradients of the loss or margin in float64, one autograd call per sample."""
    w = ckpt["weight"].double().requires_grad_(True)
    b = ckpt["bias"].double().requires_grad_(True)
    rows, probs = [], []
    for i in range(len(dataset)):
        x, y = dataset[i]
        logp = torch.log_softmax(x.double() @ w.T + b, 0)[y]
        out = -logp if which == "loss" else logp - torch.log1p(-torch.exp(logp))
        gw, gb = torch.autograd.grad(out, [w, b])
        rows.append(torch.cat([gw.reshape(-1), gb]))
        probs.append(float(torch.exp(logp.detach())))
    return torch.stack(rows), torch.tensor(probs, dtype=torch.float64)


def test_replay_loader_reads_once_and_replays_the_same_batches():
    train, _ = _data()
    task, _, _ = _task()
    att = GradDotAttributor(task)
    src = Counting(DataLoader(train, batch_size=7))
    r = ReplayLoader(att, src, "train loader")
    first = [b[0] for b in r]
    second = [b[0] for b in r]
    assert src.iterations == 1 and len(first) == 6
    assert all(a is b for a, b in zip(first, second, strict=True))
    # over the memory bound: read again every time, same content
    src2 = Counting(DataLoader(train, batch_size=7))
    small = ReplayLoader(att, src2, "train loader", max_bytes=100)
    assert [torch.equal(a, b[0]) for a, b in zip(first, small, strict=True)] == [True] * 6
    list(small)
    assert src2.iterations == 2 and not small.replayable
    # an abandoned first pass keeps nothing
    src3 = Counting(DataLoader(train, batch_size=7))
    r3 = ReplayLoader(att, src3, "train loader")
    next(iter(r3))
    list(r3)
    list(r3)
    assert src3.iterations == 2


def test_per_sample_grad_blocks_concatenate_to_the_flat_gradients():
    train, _ = _data()
    task, ckpts, _ = _task(dtype=torch.float64)
    flat = task.flat_params(1)
    batch = (train.tensors[0][:9].double(), train.tensors[1][:9])
    g = task.per_sample_grads(flat, batch, which="target", index=1)
    blocks = task.per_sample_grads(flat, batch, which="target", index=1, as_blocks=True)
    assert [b.shape for b in blocks] == [(9, N_CLS * N_IN), (9, N_CLS)]
    assert torch.equal(torch.cat(blocks, 1), g)
    sub = TensorDataset(*batch)
    torch.testing.assert_close(g, _grads64(ckpts[1], sub, "margin")[0], rtol=1e-10, atol=1e-12)


def test_trak_float32_sparse_gradients_match_the_float64_closed_form():
    train, test = _data()
    task, ckpts, prob = _task(num_ckpt=2)
    k = 16
    att = TRAKAttributor(task, prob, projector_kwargs={"proj_dim": k, "seed": 3})
    compacted = []
    tr = DataLoader(train, batch_size=20)
    te = DataLoader(test, batch_size=6)
    att.cache(tr)
    proj0 = att._projector(0)
    real = type(proj0)._compact

    def spy(self, x, p, key):
        out = real(self, x, p, key)
        compacted.append(out[0].shape[1] < x.shape[1])
        return out

    type(proj0)._compact = spy
    try:
        scores = att.attribute(tr, te)
    finally:
        type(proj0)._compact = real
    assert any(compacted)  # the sparse weight gradients took the zero-column path
    d = N_IN * N_CLS + N_CLS
    kernels, qs = [], []
    for c, ckpt in enumerate(ckpts):
        P = make_projector(d, k, seed=3 + c, dtype=torch.float64).matrix()  # = the float32 one
        g_tr, p_tr = _grads64(ckpt, train, "margin")
        g_te, _ = _grads64(ckpt, test, "margin")
        phi_tr, phi_te = g_tr @ P, g_te @ P
        kernels.append(phi_tr @ torch.linalg.solve(phi_tr.T @ phi_tr, phi_te.T))
        qs.append(1 - p_tr)
    expected = torch.stack(kernels).mean(0) * torch.stack(qs).mean(0)[:, None]
    assert scores.dtype == torch.float32
    scale = float(expected.abs().max())
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(
        att.self_attribute(tr).double(),
        torch.diagonal(att.attribute(tr, tr)).double(),
        rtol=1e-4,
        atol=1e-5 * scale,
    )


def test_tracin_reads_each_loader_once_and_matches_the_float64_oracle():
    train, test = _data(seed=1)
    task, ckpts, _ = _task(num_ckpt=3, seed=1)
    k = 24
    att = TracInAttributor(task, [0.5, 0.25, 0.125], projector_kwargs={"proj_dim": k, "seed": 9})
    tr, te = Counting(DataLoader(train, batch_size=16)), Counting(DataLoader(test, batch_size=4))
    scores = att.attribute(tr, te)
    assert tr.iterations == 1 and te.iterations == 1  # replayed for checkpoints 1 and 2
    d = N_IN * N_CLS + N_CLS
    expected = torch.zeros(N_TRAIN, N_TEST, dtype=torch.float64)
    for c, (w, ckpt) in enumerate(zip([0.5, 0.25, 0.125], ckpts, strict=True)):
        P = make_projector(d, k, seed=9 + c, dtype=torch.float64).matrix()
        g_tr, _ = _grads64(ckpt, train, "loss")
        g_te, _ = _grads64(ckpt, test, "margin")
        expected += w * (g_tr @ P) @ (g_te @ P).T
    scale = float(expected.abs().max())
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-5 * scale)
    self_scores = att.self_attribute(DataLoader(train, batch_size=16))
    assert self_scores.shape == (N_TRAIN,)


@pytest.mark.parametrize("method", ["trak", "tracin"])
def test_checkpoints_are_not_reloaded_per_batch(method):
    train, test = _data()
    task, _, prob = _task(num_ckpt=3)
    loads = []
    real = task._load
    task._load = lambda index: loads.append(index) or real(index)
    tr, te = DataLoader(train, batch_size=5), DataLoader(test, batch_size=2)
    other = DataLoader(torch.utils.data.Subset(train, range(30)), batch_size=5)
    if method == "trak":
        att = TRAKAttributor(task, prob, projector_kwargs={"proj_dim": 8})
        loads.clear()
        att.cache(tr)  # 8 train batches per checkpoint
        assert len(loads) <= 2 * task.num_checkpoints
    else:
        att = TracInAttributor(task, [1.0, 1.0, 1.0], projector_kwargs={"proj_dim": 8})
    loads.clear()
    att.attribute(other, te)  # not the cached content: train features recomputed
    assert len(loads) <= 2 * task.num_checkpoints
