import torch
from torch import nn

from tdabench.benchmark.targets import make_probability_func, make_target_func


def test_probability_matches_softmax_and_margin_identity():
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    params = dict(model.named_parameters())
    x = torch.randn(1, 5, dtype=torch.float64)
    y = torch.tensor([2])
    p = make_probability_func(model, "classification")(params, (x, y))
    ref = torch.softmax(model(x), -1)[0, 2]
    assert torch.allclose(p, ref)
    margin = make_target_func(model, "classification", "margin")(params, (x, y))
    assert torch.allclose(margin, torch.log(p / (1 - p)))


def test_margin_works_under_vmap_per_sample_grads():
    from tdabench.func.utils import per_sample_grads_named

    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    f = make_target_func(model, "classification", "margin")
    g = per_sample_grads_named(f, params, (x, y))
    for i in range(3):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        f(p, (x[i : i + 1], y[i : i + 1])).backward()
        ref = torch.cat([p[k].grad.reshape(-1) for k in params])
        assert torch.allclose(g[i], ref)
