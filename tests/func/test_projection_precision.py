"""Projection precision: the matrix never changes; fp32/fp64 results are unchanged on the CPU."""

from __future__ import annotations

import pytest
import torch

from tdabench.errors import ConfigError
from tdabench.func.projection import make_projector, resolve_projector_kwargs


def _x(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(9, 700, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tf32_is_exact_on_the_cpu_and_the_matrix_is_shared(dtype):
    ref = make_projector(700, 16, seed=1, dtype=dtype)
    tf32 = make_projector(700, 16, seed=1, dtype=dtype, precision="tf32")
    assert torch.equal(tf32.matrix(), ref.matrix())
    x = _x(dtype)
    torch.testing.assert_close(
        tf32.project(x), ref.project(x), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0
    )
    assert torch.backends.cuda.matmul.allow_tf32 is False or torch.cuda.is_available()


def test_bf16_is_close_and_keeps_the_dtype():
    ref = make_projector(700, 16, seed=2, dtype=torch.float32)
    bf = make_projector(700, 16, seed=2, dtype=torch.float32, precision="bf16")
    x = _x(torch.float32)
    exact = x.double() @ ref.matrix().double()
    got = bf.project(x)
    assert got.dtype == torch.float32
    rel = float((got.double() - exact).norm() / exact.norm())
    assert 0 < rel < 2e-2  # bfloat16 operands: ~3 significant digits, but not exact


def test_precision_is_validated_and_resolved():
    with pytest.raises(ConfigError, match="precision"):
        make_projector(10, 2, precision="fp8")
    with pytest.raises(ConfigError, match="precision"):
        resolve_projector_kwargs({"precision": "half"})
    assert resolve_projector_kwargs({"precision": "bf16"})["precision"] == "bf16"
    assert resolve_projector_kwargs({})["precision"] == "highest"
