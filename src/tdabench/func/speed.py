"""Backend settings for our per-sample-gradient calls on accelerators, set and restored.

torch's global backend flags (cuDNN autotuning, TF32) belong to the user's process: tdabench
sets them only *inside* its own calls and restores the previous values on exit, also on
error. On the CPU nothing is changed.

Defaults (CUDA): ``cudnn.benchmark`` on (autotuned convolution algorithms; the same maths,
chosen per input shape, which pays for the many identical per-sample-gradient pieces) and TF32
off (it rounds the products to 10-bit mantissas; enable it with ``tf32=True`` once LDS was
measured unchanged for the setting).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["backend_flags"]


@contextlib.contextmanager
def backend_flags(
    device: torch.device | str, *, cudnn_benchmark: bool = True, tf32: bool = False
) -> Iterator[None]:
    """Inside the context on a CUDA ``device``: ``torch.backends.cudnn.benchmark =
    cudnn_benchmark`` and TF32 matmuls/convolutions ``= tf32``; restored on exit. A no-op on
    other devices."""
    if torch.device(device).type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = cudnn_benchmark, tf32, tf32
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved
