"""The toy run's model: a tiny pre-LayerNorm causal transformer with one tied embedding matrix
(see ``embdist.toytrain`` for the run and why every row starts as one vector)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# the model


_MASKS: dict[tuple[int, str], torch.Tensor] = {}


def _causal_mask(t: int, device: torch.device) -> torch.Tensor:
    key = (t, str(device))
    if key not in _MASKS:
        _MASKS[key] = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
    return _MASKS[key]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim, **kw)
        self.qkv = nn.Linear(dim, 3 * dim, **kw)
        self.proj = nn.Linear(dim, dim, **kw)
        self.ln2 = nn.LayerNorm(dim, **kw)
        self.fc1 = nn.Linear(dim, 4 * dim, **kw)
        self.fc2 = nn.Linear(4 * dim, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (b, heads, t, head_dim)
        # explicit causal attention: torch's CPU flash-attention backward is slow in bf16 at
        # this size (about 7 ms a call, against well under 1 ms for these small matmuls)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // self.heads))
        scores = scores.masked_fill(_causal_mask(t, x.device), float("-inf"))
        a = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class _ToyLM(nn.Module):
    """Byte-level causal transformer whose one matrix ``wte`` is embedding and unembedding."""

    def __init__(self, *, vocab: int, dim: int, context: int, layers: int, heads: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.wte = nn.Parameter(torch.empty(vocab, dim, **kw))
        self.wpe = nn.Parameter(torch.empty(context, dim, **kw))
        self.blocks = nn.ModuleList(_Block(dim, heads, **kw) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim, **kw)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = F.embedding(idx, self.wte) + self.wpe[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.t()  # tied unembedding

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator, *, init_std: float, layers: int) -> None:
        def normal_(p: torch.Tensor, std: float) -> None:
            # sample in float32 from the private generator, round once to the storage dtype
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

        # "qweninit": every token starts at ONE shared vector
        shared = torch.randn(self.wte.shape[1], generator=gen, dtype=torch.float32) * init_std
        self.wte.copy_(shared.expand_as(self.wte))
        normal_(self.wpe, init_std)
        resid_std = init_std / math.sqrt(2 * layers)
        for block in self.blocks:
            for lin in (block.qkv, block.proj, block.fc1, block.fc2):
                normal_(lin.weight, resid_std if lin in (block.proj, block.fc2) else init_std)
                lin.bias.zero_()
        for mod in self.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
