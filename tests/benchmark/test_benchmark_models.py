"""Models: parameter counts, forward passes, causality, relative attention, torch.func use."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from tdabench.benchmark import get_setting, list_settings
from tdabench.benchmark.models import (
    MusicTransformer,
    NanoGPT,
    RelativeSelfAttention,
    ResNet9,
    count_parameters,
    relative_skew,
)
from tdabench.errors import ShapeError

# published sizes (reference table) and the exact counts of our implementation
PARAMS = {
    "mnist_lr": (7_840, 7_850),
    "mnist_mlp": (110_000, 109_386),
    "fmnist_lr": (7_840, 7_850),
    "fmnist_mlp": (110_000, 109_386),
    "cifar2_resnet9": (4_830_000, 4_825_154),
    "cifar10_resnet9": (4_830_000, 4_829_258),
    "shakespeare_nanogpt": (10_700_000, 10_756_992),
    "maestro_musictransformer": (13_300_000, 13_113_732),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_full_model_parameter_counts(name: str) -> None:
    published, exact = PARAMS[name]
    n = count_parameters(get_setting(name).build_model())  # CPU: ~1 s for the largest
    assert n == exact
    assert abs(n - published) / published < 0.02


def _tiny_inputs(name: str, n: int = 3) -> torch.Tensor:
    s = get_setting(name)
    g = torch.Generator().manual_seed(0)
    if s.kind == "sequence":
        T = s.data_config.get("block_size") or s.data_config["seq_len"]
        return torch.randint(0, s.num_classes, (n, T), generator=g)
    if s.dataset == "cifar":
        return torch.randn(n, 3, 32, 32, generator=g)
    return torch.rand(n, 784, generator=g)


@pytest.mark.parametrize(
    "name", [n for n in list_settings() if n.endswith("_tiny") or n.startswith(("mnist", "fmnist"))]
)
def test_forward_of_each_small_model(name: str) -> None:
    s = get_setting(name)
    torch.manual_seed(0)
    model = s.build_model()
    x = _tiny_inputs(name)
    model.train()
    out = model(x)
    expect = (3, x.shape[1], s.num_classes) if s.kind == "sequence" else (3, s.num_classes)
    assert out.shape == expect and torch.isfinite(out).all()
    out.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model(x), model(x))  # eval is deterministic (dropout off)


def test_initialisation_follows_the_global_rng() -> None:
    s = get_setting("shakespeare_nanogpt_tiny")
    torch.manual_seed(5)
    a = s.build_model().state_dict()
    torch.manual_seed(5)
    b = s.build_model().state_dict()
    torch.manual_seed(6)
    c = s.build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_relative_skew_matches_brute_force() -> None:
    torch.manual_seed(0)
    T, dh = 7, 4
    q = torch.randn(2, T, dh)
    E = torch.randn(T, dh)  # row r embeds distance r - (T - 1)
    skewed = relative_skew(q @ E.t())
    for i in range(T):
        for j in range(i + 1):
            torch.testing.assert_close(skewed[:, i, j], q[:, i] @ E[(T - 1) + j - i])


def test_relative_attention_matches_explicit_formula() -> None:
    torch.manual_seed(1)
    attn = RelativeSelfAttention(d_model=8, n_head=2, max_len=10, dropout=0.0).double().eval()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    out = attn(x)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    heads = []
    T, dh = 6, 4
    Er = attn.Er[10 - T :]
    for h in range(2):
        qh, kh, vh = (t[0, :, h * dh : (h + 1) * dh] for t in (q, k, v))
        logits = torch.full((T, T), float("-inf"), dtype=torch.float64)
        for i in range(T):
            for j in range(i + 1):
                logits[i, j] = (qh[i] @ kh[j] + qh[i] @ Er[(T - 1) + j - i]) / dh**0.5
        heads.append(logits.softmax(-1) @ vh)
    expect = attn.proj(torch.cat(heads, dim=-1)).unsqueeze(0)
    torch.testing.assert_close(out, expect)


@pytest.mark.parametrize("cls", [NanoGPT, MusicTransformer])
def test_sequence_models_are_causal(cls) -> None:
    torch.manual_seed(0)
    kw = (
        {"n_embd": 16, "n_head": 2, "n_layer": 2, "block_size": 12}
        if cls is NanoGPT
        else {"d_model": 16, "n_head": 2, "n_layer": 2, "d_ff": 32, "max_len": 12}
    )
    model = cls(vocab_size=20, dropout=0.0, **kw).eval()
    x = torch.randint(0, 20, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 20
    torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])
    assert not torch.allclose(model(x)[:, 8:], model(y)[:, 8:])
    with pytest.raises(ShapeError, match="crop"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize(
    "name",
    [
        "cifar2_resnet9_tiny",
        "shakespeare_nanogpt_tiny",
        "maestro_musictransformer_tiny",
        "mnist_mlp",
    ],
)
def test_per_sample_grads_with_vmap_match_a_loop(name: str) -> None:
    s = get_setting(name)
    torch.manual_seed(0)
    model = s.build_model().double().eval()
    x = _tiny_inputs(name, 3)
    x = x.double() if x.is_floating_point() else x
    if s.kind == "sequence":
        y = torch.randint(0, s.num_classes, x.shape)
    else:
        y = torch.randint(0, s.num_classes, (3,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = s.loss_func(model)

    def one(p, xi, yi):
        return loss(p, (xi.unsqueeze(0), yi.unsqueeze(0)))

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        model.zero_grad()
        p = dict(model.named_parameters())
        loss(p, (x[i : i + 1], y[i : i + 1])).backward()
        for k, v in model.named_parameters():
            torch.testing.assert_close(g[k][i], v.grad, rtol=1e-8, atol=1e-10)
    # functional_call with a subset of parameters keeps the rest from the module
    last = list(params)[-1]
    out = functional_call(model, {last: params[last] * 0}, (x,))
    assert torch.isfinite(out).all()


def test_resnet9_default_widths_and_shapes() -> None:
    m = ResNet9(num_classes=2, widths=(4, 8, 8, 16)).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 2)  # global pooling: any size
