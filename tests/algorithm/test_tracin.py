"""TracIn / Grad-Dot / Grad-Cos against brute-force autograd loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import GradCosAttributor, GradDotAttributor, TracInAttributor
from tdabench.errors import ConfigError
from tdabench.func.projection import make_projector
from tdabench.task import AttributionTask

N_TRAIN, N_TEST, N_IN, N_CLS = 11, 5, 3, 3


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(N_IN, 4)
        self.fc2 = nn.Linear(4, N_CLS)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _setup(num_ckpt=3, seed=0):
    torch.manual_seed(seed)
    model = Tiny().double()
    g = torch.Generator().manual_seed(seed + 1)
    ckpts = []
    for _ in range(num_ckpt):
        ckpts.append(
            {
                k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                for k, v in model.state_dict().items()
            }
        )
    x = torch.randn(N_TRAIN + N_TEST, N_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLS, (N_TRAIN + N_TEST,), generator=g)
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    test = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    return model, ckpts, train, test


def _loss(model):
    def f(params, data):
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return f


def _margin(model):
    def f(params, data):
        x, y = data
        logits = functional_call(model, params, (x,))
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.masked_fill(torch.arange(N_CLS) == y[:, None], float("-inf"))
        return (true - torch.logsumexp(others, dim=1)).mean()

    return f


def _brute_grads(model, ckpt, dataset, kind="loss", layer=None):
    """One autograd call per sample on a real nn.Module (independent of torch.func)."""
    m = Tiny().double()
    m.load_state_dict(ckpt)
    params = [p for n, p in m.named_parameters() if layer is None or n.startswith(layer + ".")]
    rows = []
    for i in range(len(dataset)):
        x, y = dataset[i]
        logits = m(x[None])
        if kind == "loss":
            val = F.cross_entropy(logits, y[None])
        else:
            others = torch.cat([logits[0, :y], logits[0, y + 1 :]])
            val = logits[0, y] - torch.logsumexp(others, dim=0)
        gs = torch.autograd.grad(val, params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _loaders(train, test, bs=3):
    return DataLoader(train, batch_size=bs, shuffle=False), DataLoader(
        test, batch_size=2, shuffle=False
    )


def test_tracincp_matches_brute_force_loop():
    model, ckpts, train, test = _setup()
    task = AttributionTask(_loss(model), model, ckpts)
    w = [0.1, 0.05, 0.02]
    tr, te = _loaders(train, test)
    assert len(tr) >= 3
    att = TracInAttributor(
        task, weight_list=torch.tensor(w, dtype=torch.float64), normalized_grad=False
    )
    att.cache(tr)  # no-op, allowed
    scores = att.attribute(tr, te)
    expected = torch.zeros(N_TRAIN, N_TEST, dtype=torch.float64)
    for k in range(3):
        g_tr = _brute_grads(model, ckpts[k], train)
        g_te = _brute_grads(model, ckpts[k], test)
        for i in range(N_TRAIN):
            for j in range(N_TEST):
                expected[i, j] += w[k] * float(g_tr[i] @ g_te[j])
    assert scores.shape == (N_TRAIN, N_TEST) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)), rtol=1e-10, atol=1e-12
    )


def test_target_gradient_on_test_side_and_layer_name():
    model, ckpts, train, test = _setup(num_ckpt=2)
    task = AttributionTask(_loss(model), model, ckpts, target_func=_margin(model))
    tr, te = _loaders(train, test)
    att = TracInAttributor(task, [1.0, 2.0], layer_name="fc2")
    expected = sum(
        wk
        * _brute_grads(model, ckpts[k], train, "loss", "fc2")
        @ _brute_grads(model, ckpts[k], test, "margin", "fc2").T
        for k, wk in enumerate([1.0, 2.0])
    )
    torch.testing.assert_close(att.attribute(tr, te), expected, rtol=1e-10, atol=1e-12)
    # self-influence stays the diagonal of attribute(train, train) even when target != loss
    torch.testing.assert_close(
        att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)), rtol=1e-10, atol=1e-12
    )


def test_projected_tracin_uses_seed_plus_checkpoint():
    model, ckpts, train, test = _setup(num_ckpt=2)
    task = AttributionTask(_loss(model), model, ckpts)
    tr, te = _loaders(train, test)
    d = sum(p.numel() for p in model.parameters())
    kw = {"proj_dim": 6, "proj_type": "rademacher", "seed": 4}
    att = TracInAttributor(task, [0.5, 0.25], projector_kwargs=kw)
    expected = 0
    for k, wk in enumerate([0.5, 0.25]):
        P = make_projector(d, 6, seed=4 + k, proj_type="rademacher", dtype=torch.float64).matrix()
        expected = (
            expected
            + wk
            * (_brute_grads(model, ckpts[k], train) @ P)
            @ (_brute_grads(model, ckpts[k], test) @ P).T
        )
    torch.testing.assert_close(att.attribute(tr, te), expected, rtol=1e-10, atol=1e-12)
    assert kw == {"proj_dim": 6, "proj_type": "rademacher", "seed": 4}  # not mutated
    torch.testing.assert_close(
        att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)), rtol=1e-10, atol=1e-12
    )


def test_projected_gradients_in_row_pieces_give_the_same_scores(monkeypatch):
    """With a gradient budget of one row, per-sample gradients are computed and projected one
    sample at a time (bounded memory): the scores of TracIn and TRAK do not change."""
    from tdabench.algorithm import TRAKAttributor

    model, ckpts, train, test = _setup(num_ckpt=2)
    task = AttributionTask(_loss(model), model, ckpts)
    tr, te = _loaders(train, test)
    kw = {"proj_dim": 6, "seed": 4}

    def prob(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        return torch.softmax(out, dim=1).gather(1, data[1][:, None]).mean()

    def run(budget=None):
        tracin = TracInAttributor(
            task, [0.5, 0.25], projector_kwargs=kw, normalized_grad=True, memory_budget=budget
        )
        trak = TRAKAttributor(
            task, prob, projector_kwargs=kw, regularization=1e-2, memory_budget=budget
        )
        trak.cache(tr)
        return tracin.attribute(tr, te), tracin.self_attribute(tr), trak.attribute(tr, te)

    whole = run()
    calls = []
    orig = task.per_sample_grads

    def spy(flat, batch, *a, **k):
        calls.append(int(batch[0].shape[0]))
        return orig(flat, batch, *a, **k)

    monkeypatch.setattr(task, "per_sample_grads", spy)
    pieced = run(budget=1)  # a one-byte budget: one row per piece
    assert calls and set(calls) == {1}
    for a, b in zip(whole, pieced, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_grad_cos_is_cosine_similarity():
    model, ckpts, train, test = _setup(num_ckpt=2)
    task = AttributionTask(_loss(model), model, ckpts)
    tr, te = _loaders(train, test)
    att = GradCosAttributor(task)  # last checkpoint by default
    g_tr = _brute_grads(model, ckpts[1], train)
    g_te = _brute_grads(model, ckpts[1], test)
    expected = F.cosine_similarity(g_tr[:, None, :], g_te[None, :, :], dim=2)
    torch.testing.assert_close(att.attribute(tr, te), expected, rtol=1e-10, atol=1e-12)
    self_scores = att.self_attribute(tr)
    torch.testing.assert_close(
        self_scores, torch.ones(N_TRAIN, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        self_scores, torch.diagonal(att.attribute(tr, tr)), rtol=1e-10, atol=1e-12
    )
    # TracIn with normalized_grad on one checkpoint equals Grad-Cos
    one = AttributionTask(_loss(model), model, [ckpts[1]])
    torch.testing.assert_close(
        TracInAttributor(one, [1.0], normalized_grad=True).attribute(tr, te),
        expected,
        rtol=1e-10,
        atol=1e-12,
    )


def test_grad_dot_one_checkpoint():
    model, ckpts, train, test = _setup(num_ckpt=2)
    task = AttributionTask(_loss(model), model, ckpts)
    tr, te = _loaders(train, test)
    for index in (0, -1):
        att = GradDotAttributor(task, checkpoint_index=index)
        c = ckpts[index]
        expected = _brute_grads(model, c, train) @ _brute_grads(model, c, test).T
        torch.testing.assert_close(att.attribute(tr, te), expected, rtol=1e-10, atol=1e-12)
        g = _brute_grads(model, c, train)
        torch.testing.assert_close(att.self_attribute(tr), (g * g).sum(1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)), rtol=1e-10, atol=1e-12
        )
    assert GradDotAttributor(task).hyperparameters()["checkpoint_indices"] == [1]


def test_bad_input():
    model, ckpts, _, _ = _setup(num_ckpt=3)
    task = AttributionTask(_loss(model), model, ckpts)
    with pytest.raises(ConfigError, match="3 checkpoint"):
        TracInAttributor(task, [1.0, 1.0])
    with pytest.raises(ConfigError):
        TracInAttributor(task, [[1.0, 1.0, 1.0]])
    with pytest.raises(ConfigError):
        TracInAttributor(task, [1.0, float("nan"), 1.0])
    with pytest.raises(ConfigError, match="unknown projector_kwargs"):
        TracInAttributor(
            task, [1.0, 1.0, 1.0], projector_kwargs={"proj_dim": 4, "use_half_precision": True}
        )
    with pytest.raises(ConfigError, match="unknown projector_kwargs"):
        GradDotAttributor(task, projector_kwargs={"projection_dim": 4})
    with pytest.raises(ConfigError, match="checkpoint_index"):
        GradCosAttributor(task, checkpoint_index=3)
    with pytest.raises(ConfigError, match="layer_name"):
        GradDotAttributor(task, layer_name="fc9")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    model, ckpts, train, test = _setup(num_ckpt=2)
    task = AttributionTask(_loss(model), model, ckpts)
    tr, te = _loaders(train, test)
    cpu = TracInAttributor(task, [0.5, 0.5]).attribute(tr, te)
    gpu = TracInAttributor(task, [0.5, 0.5], device="cuda").attribute(tr, te)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-12)
    # a projected run on CUDA is deterministic across memory budgets
    kw = {"proj_dim": 5, "seed": 1}
    a = TracInAttributor(task, [0.5, 0.5], projector_kwargs=kw, device="cuda").attribute(tr, te)
    b = TracInAttributor(
        task, [0.5, 0.5], projector_kwargs={**kw, "max_chunk_bytes": 10**6}, device="cuda"
    )
    torch.testing.assert_close(b.attribute(tr, te), a, rtol=1e-10, atol=1e-12)


def test_loader_that_changes_between_checkpoints_is_refused(monkeypatch):
    """Without replay (a loader too big to keep), a train loader that yields a different number
    of samples at a later checkpoint raises instead of mixing rows."""
    from tdabench.algorithm.base import BaseAttributor
    from tdabench.errors import DataError

    model, ckpts, train, test = _setup(num_ckpt=2)
    task = AttributionTask(_loss(model), model, ckpts)
    _, te = _loaders(train, test)

    class Shrinking:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            n = len(train) if self.calls == 1 else len(train) - 3
            return iter(DataLoader(torch.utils.data.Subset(train, range(n)), batch_size=3))

    monkeypatch.setattr(BaseAttributor, "_replay", lambda self, loader, what: loader)
    att = TracInAttributor(task, [0.5, 0.5])
    with pytest.raises(DataError, match="fixed order and size"):
        att.attribute(Shrinking(), te)
