"""Models of the benchmark settings, written for this project.

Every model takes a batch with a leading dimension and works under ``torch.func``
(``functional_call``, ``vmap`` over samples, ``grad``): no in-place updates of parameters,
masks built from the input's shape. Parameter counts of the full configurations
(see :func:`count_parameters`):

=====================================  ============  ==========
model                                  params        reference
=====================================  ============  ==========
LogisticRegression(784, 10)            7,850         7,840 (weights only)
MLP 784-128-64-10                      109,386       0.11M
ResNet9, 10 classes / 2 classes        4,829,258 / 4,825,154   4.83M
NanoGPT 6x384, 6 heads, vocab 96       10,756,992    10.7M
MusicTransformer 6x512, ff 1024        13,113,732    13.3M
=====================================  ============  ==========
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdabench.errors import ConfigError, ShapeError

__all__ = [
    "MLP",
    "LogisticRegression",
    "MusicTransformer",
    "NanoGPT",
    "RelativeSelfAttention",
    "ResNet9",
    "count_parameters",
    "relative_skew",
]


def count_parameters(model: nn.Module) -> int:
    """Number of (distinct) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- classifiers
class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear map of the flattened input to class logits.

    Input ``(B, ...)`` with ``in_features`` values per sample; output ``(B, num_classes)``.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of inputs ``(B, ...)`` (flattened)."""
        return self.linear(x.flatten(1))

    def linear_relu_stack(self) -> list[tuple[str, nn.Linear, bool]]:
        """``forward(x) == linear(x.flatten(1))``: lets the batched trainer use its hand-written
        Linear/ReLU fast path (``tdabench.groundtruth._fast_mlp``)."""
        return [("linear", self.linear, False)]


class MLP(nn.Module):
    """Fully connected ReLU network with dropout after each hidden layer (784-128-64-10 by default).

    Input ``(B, ...)`` flattened to ``in_features``; output ``(B, num_classes)``.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: tuple[int, ...] = (128, 64),
        num_classes: int = 10,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(), nn.Dropout(dropout)]
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of inputs ``(B, ...)`` (flattened)."""
        return self.net(x.flatten(1))

    def linear_relu_stack(self) -> list[tuple[str, nn.Linear, bool]] | None:
        """The Linear/ReLU layers when every dropout is 0 (the batched trainer's fast path has no
        dropout; with dropout on, ``None``)."""
        mods = list(self.net.named_children())
        if any(isinstance(m, nn.Dropout) and m.p > 0 for _, m in mods):
            return None
        out: list[tuple[str, nn.Linear, bool]] = []
        for i, (name, m) in enumerate(mods):
            if isinstance(m, nn.Linear):
                relu = i + 1 < len(mods) and isinstance(mods[i + 1][1], nn.ReLU)
                out.append((f"net.{name}", m, relu))
        return out


class _ResidualBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU layers plus a (projected when the shape changes) skip connection."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.drop = nn.Dropout(dropout)
        if stride != 1 or c_in != c_out:
            self.skip: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            self.skip = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(F.relu(self.bn1(self.conv1(x))))
        h = self.drop(F.relu(self.bn2(self.conv2(h))))
        return F.relu(h + self.skip(x))


class ResNet9(nn.Module):
    """The reference suite's ResNet-9: a 3x3 stem and three residual blocks, average-pooled.

    Stem conv (``widths[0]``), then one two-conv residual block per stage with ``widths[1:]``
    channels and strides 1, 2, 2, global average pooling and a linear classifier; batch norm
    after every conv, dropout ``dropout`` after every activation. With the default widths
    ``(64, 128, 256, 512)`` and 10 classes it has 4,829,258 parameters (the reference's 4.83M;
    David Page's DAWNBench ResNet-9 has 6.57M and is a different network).

    Batch norm keeps running statistics: train it with ``model.train()`` and a plain loop, or
    call :func:`torch.func.replace_all_batch_norm_modules_` before vmapping training steps;
    attribution (``model.eval()``) uses the running statistics and is vmap-safe.

    Input ``(B, in_channels, H, W)``; output ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        in_channels: int = 3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ConfigError(f"ResNet9 needs 4 widths (stem + 3 stages), got {widths}")
        w0, w1, w2, w3 = (int(w) for w in widths)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w0, 3, padding=1, bias=False),
            nn.BatchNorm2d(w0),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.stage1 = _ResidualBlock(w0, w1, 1, dropout)
        self.stage2 = _ResidualBlock(w1, w2, 2, dropout)
        self.stage3 = _ResidualBlock(w2, w3, 2, dropout)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 3, H, W)``."""
        h = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(h.mean(dim=(-2, -1)))


# --------------------------------------------------------------------------- sequence models
def _check_heads(d: int, n_head: int, what: str) -> None:
    if d % n_head:
        raise ConfigError(f"{what} {d} must be divisible by the number of heads {n_head}")


def _causal_mask(T: int, device: torch.device) -> Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


class _CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        _check_heads(d, n_head, "embedding size")
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.n_head)
        att = att.masked_fill(~_causal_mask(T, x.device), float("-inf"))
        att = self.attn_drop(att.softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, d)
        return self.resid_drop(self.proj(y))


class _GPTBlock(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d, bias=bias)
        self.attn = _CausalSelfAttention(d, n_head, dropout, bias)
        self.ln2 = nn.LayerNorm(d, bias=bias)
        self.fc = nn.Linear(d, 4 * d, bias=bias)
        self.out = nn.Linear(4 * d, d, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class NanoGPT(nn.Module):
    """A GPT-2-style character decoder (nanoGPT's Shakespeare-char configuration by default).

    Token + learned position embeddings, ``n_layer`` pre-norm blocks (causal self-attention,
    GELU MLP of width ``4 * n_embd``), a final layer norm, and output logits through the
    token embedding matrix (weight tying without a second parameter, so state dicts hold no
    shared tensors). Linear/embedding weights ~ N(0, 0.02), residual output projections
    ~ N(0, 0.02 / sqrt(2 n_layer)), biases zero.

    Input token ids ``(B, T)`` int64 with ``T <= block_size``; output logits ``(B, T, vocab_size)``.
    """

    # Spelled out: the model's hyper-parameters, named as in nanoGPT.
    def __init__(
        self,
        vocab_size: int = 96,
        block_size: int = 256,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.2,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            _GPTBlock(n_embd, n_head, dropout, bias) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = (
                    0.02 / math.sqrt(2 * n_layer)
                    if name.endswith(("attn.proj.weight", "out.weight"))
                    else 0.02
                )
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(B, T, vocab_size)`` of token ids ``(B, T)``."""
        T = idx.shape[-1]
        if self.block_size < T:
            raise ShapeError(
                f"sequence length {T} exceeds block_size {self.block_size}; crop the input"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok_emb.weight.t()


def relative_skew(rel_logits: Tensor) -> Tensor:
    """The memory-efficient "skewing" of Music Transformer (Huang et al., 2018, Sec. 3.4.1).

    Args:
        rel_logits: ``(..., T, T)`` with ``rel_logits[..., i, r] = q_i . E_r``, where row
            ``r`` of ``E`` embeds the relative distance ``r - (T - 1)`` (``-(T-1) .. 0``).

    Returns:
        ``(..., T, T)`` with ``out[..., i, j] = q_i . E_{(T-1) + j - i}`` for ``j <= i``
        (entries above the diagonal are meaningless and must be masked). Uses one pad and
        one reshape, no ``(T, T, d)`` tensor.
    """
    *lead, T, T2 = rel_logits.shape
    if T != T2:
        raise ShapeError(
            f"relative logits must be square in the last two dims, got {tuple(rel_logits.shape)}"
        )
    padded = F.pad(rel_logits, (1, 0))  # (..., T, T+1)
    return padded.reshape(*lead, T + 1, T)[..., 1:, :]


class RelativeSelfAttention(nn.Module):
    """Causal multi-head self-attention with relative position representations (Shaw et al.),
    computed with :func:`relative_skew`. One relative embedding table ``Er`` of shape
    ``(max_len, d_head)`` per layer, shared by the heads (as in Music Transformer).

    Input ``(B, T, d_model)`` with ``T <= max_len``; output ``(B, T, d_model)``.
    """

    def __init__(self, d_model: int, n_head: int, max_len: int, dropout: float) -> None:
        super().__init__()
        _check_heads(d_model, n_head, "d_model")
        self.n_head = n_head
        self.d_head = d_model // n_head
        self.max_len = max_len
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.Er = nn.Parameter(torch.empty(max_len, self.d_head))
        nn.init.normal_(self.Er, std=self.d_head**-0.5)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Attention output ``(B, T, d_model)`` of ``x`` ``(B, T, d_model)``."""
        B, T, d = x.shape
        if self.max_len < T:
            raise ShapeError(f"sequence length {T} exceeds max_len {self.max_len}; crop the input")
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))
        rel = relative_skew(q @ self.Er[self.max_len - T :].t())  # (B, H, T, T)
        att = (q @ k.transpose(-2, -1) + rel) / math.sqrt(self.d_head)
        att = att.masked_fill(~_causal_mask(T, x.device), float("-inf"))
        att = self.drop(att.softmax(dim=-1))
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, d))


class _MTBlock(nn.Module):
    def __init__(self, d: int, n_head: int, d_ff: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = RelativeSelfAttention(d, n_head, max_len, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, d_ff)
        self.ff2 = nn.Linear(d_ff, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ff2(self.drop(F.relu(self.ff1(self.ln2(x))))))


def _sinusoid(T: int, d: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    pos = torch.arange(T, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(
        torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d)
    )
    pe = torch.zeros(T, d, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return pe.to(dtype)


class MusicTransformer(nn.Module):
    """Decoder-only Music Transformer with relative attention (Huang et al., 2018).

    Token embedding scaled by ``sqrt(d_model)`` plus sinusoidal absolute positions, then
    ``n_layer`` pre-norm blocks of :class:`RelativeSelfAttention` and a ReLU feed-forward
    layer of width ``d_ff``, a final layer norm and a linear output layer. Defaults: the
    reference's 6 layers, 8 heads, d 512, ff 1024, dropout 0.1, 388 event tokens, 256 steps.

    Input token ids ``(B, T)`` int64, ``T <= max_len``; output logits ``(B, T, vocab_size)``.
    """

    # Spelled out: the model's hyper-parameters, named as in Music Transformer.
    def __init__(
        self,
        vocab_size: int = 388,
        max_len: int = 256,
        n_layer: int = 6,
        n_head: int = 8,
        d_model: int = 512,
        d_ff: int = 1024,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            _MTBlock(d_model, n_head, d_ff, max_len, dropout) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(B, T, vocab_size)`` of token ids ``(B, T)``."""
        T = idx.shape[-1]
        x = self.embed(idx) * math.sqrt(self.d_model)
        x = self.drop(x + _sinusoid(T, self.d_model, idx.device, x.dtype))
        for block in self.blocks:
            x = block(x)
        return self.out(self.ln_f(x))
