"""Backend flags are set only inside our calls and restored (also on error)."""

from __future__ import annotations

import pytest
import torch

from tdabench.func.speed import backend_flags


def _flags():
    return (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )


def test_cuda_flags_set_inside_and_restored():
    before = _flags()
    torch.backends.cudnn.benchmark = False
    try:
        with backend_flags("cuda", cudnn_benchmark=True, tf32=True):
            assert _flags() == (True, True, True)
        assert _flags() == (False, before[1], before[2])
        with pytest.raises(RuntimeError), backend_flags("cuda:0", tf32=False):
            assert _flags() == (True, False, False)
            raise RuntimeError("boom")
        assert _flags() == (False, before[1], before[2])
    finally:
        torch.backends.cudnn.benchmark = before[0]


def test_cpu_is_untouched():
    before = _flags()
    with backend_flags("cpu", cudnn_benchmark=not before[0], tf32=True):
        assert _flags() == before
