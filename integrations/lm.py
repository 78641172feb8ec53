"""A small decoder-only MoE language model over bytes, built from :class:`~moebalance.integrations.torch.MoELayer`.

>>> from moebalance.integrations.lm import LMConfig, MoELM
>>> model = MoELM(LMConfig(num_experts=16, top_k=2, balancer="bip"))
>>> logits = model(idx)                        # idx [B, S] int64 bytes -> logits [B, S, 256]
>>> loss = model.loss(idx, targets)            # mean cross-entropy; plus model.aux_loss() for "aux_loss"
>>> model.max_vio()                            # [L] MaxVio of each MoE layer in the last forward

Each block is pre-norm: ``x + attention(norm(x))`` (causal multi-head self-attention through
``F.scaled_dot_product_attention``), then ``x + moe(norm(x))``. Positions are learned embeddings; the output head
shares the byte-embedding matrix. The vocabulary is the 256 byte values, so any text is a sequence of its UTF-8
bytes and no tokenizer is needed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .torch import MoEConfig, MoELayer, _positive_int

__all__ = ["LMConfig", "MoELM", "CausalSelfAttention", "Block", "VOCAB"]

VOCAB = 256  # one token per byte value


@dataclass
class LMConfig:
    """Configuration of :class:`MoELM`, checked at construction (ValueError naming the field).

    Model: ``d_model``, ``n_layers`` (blocks, each with one MoE layer), ``n_heads`` (must divide d_model),
    ``max_seq_len`` (positions). MoE: ``num_experts``, ``top_k``, ``expert_ffn`` (inner width of one expert;
    None: ``max(8, 4 * d_model // top_k)``, so the active FFN width stays about ``4 * d_model`` whatever k),
    ``router``, ``balancer``, ``aux_loss_coeff``, ``bias_update_rate``, ``capacity_factor``, ``backend``: as in
    :class:`~moebalance.integrations.torch.MoEConfig` ("bip" prices each training batch before routing it, as
    arXiv 2502.15451 does; "bip_lagged" routes with the prices of the batches before). ``bip_same_batch``:
    as in MoEConfig (None follows the balancer's name; False with "bip" means "bip_lagged").
    """

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 128
    num_experts: int = 16
    top_k: int = 2
    expert_ffn: int | None = None
    router: str = "softmax"
    balancer: str = "none"
    aux_loss_coeff: float = 1e-2
    bias_update_rate: float = 1e-3
    capacity_factor: float | None = None
    backend: str = "torch"
    bip_same_batch: bool | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            _positive_int(getattr(self, name), name)
        if self.d_model % self.n_heads:
            raise ValueError(f"`n_heads` must divide d_model={self.d_model}, got {self.n_heads}")
        if self.expert_ffn is not None:
            _positive_int(self.expert_ffn, "expert_ffn")
        self.moe_config()  # checks the MoE fields (bip_same_batch too) with MoEConfig's messages

    @property
    def ffn(self) -> int:
        """The inner width of one expert."""
        return self.expert_ffn if self.expert_ffn is not None else max(8, 4 * self.d_model // self.top_k)

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            hidden=self.d_model,
            ffn=self.ffn,
            num_experts=self.num_experts,
            top_k=self.top_k,
            router=self.router,
            balancer=self.balancer,
            aux_loss_coeff=self.aux_loss_coeff,
            bias_update_rate=self.bias_update_rate,
            capacity_factor=self.capacity_factor,
            backend=self.backend,
            dtype=torch.float32,
            bip_same_batch=self.bip_same_batch,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ffn": self.ffn}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``[B, S, d]`` -> ``[B, S, d]`` (position s sees positions <= s)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm transformer block whose feed-forward is a :class:`MoELayer`."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.moe = MoELayer(config.moe_config())

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.moe(self.norm2(x))


class MoELM(nn.Module):
    """Decoder-only byte-level MoE language model; see the module docstring."""

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise ValueError(f"`config` must be an LMConfig, got {type(config).__name__}")
        self.config = c = config
        self.embed = nn.Embedding(VOCAB, c.d_model)
        self.pos = nn.Embedding(c.max_seq_len, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        # residual projections scaled down with depth (GPT-2), so the stream starts near the embeddings
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * c.n_layers))

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks]

    def forward(self, idx: Tensor) -> Tensor:
        """``idx [B, S]`` integer bytes (``S <= max_seq_len``) -> ``logits [B, S, 256]``."""
        if idx.ndim != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"`idx` must be a [B, S] integer tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
        S = idx.shape[1]
        if S > self.config.max_seq_len:
            raise ValueError(f"`idx` has {S} positions, more than max_seq_len={self.config.max_seq_len}")
        x = self.embed(idx) + self.pos(torch.arange(S, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T  # tied output head

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-byte cross-entropy (nats) of ``targets [B, S]`` given ``idx [B, S]``."""
        if targets.shape != idx.shape:
            raise ValueError(f"`targets` must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1).long())

    def aux_loss(self) -> Tensor:
        """Sum of the MoE layers' auxiliary losses of the last forward (0 unless balancer="aux_loss")."""
        return sum((m.aux_loss for m in self.moe_layers), torch.zeros(()))

    def max_vio(self) -> Tensor:
        """``[L]`` batch MaxVio of each MoE layer in the last forward, ``(max load - mean) / mean``."""
        if any(m.last_stats is None for m in self.moe_layers):
            raise ValueError("max_vio() needs a forward pass first")
        return torch.stack([m.last_stats.max_vio for m in self.moe_layers])

    def loads(self) -> Tensor:
        """``[L, E]`` pairs routed to each expert of each MoE layer in the last forward."""
        if any(m.last_stats is None for m in self.moe_layers):
            raise ValueError("loads() needs a forward pass first")
        return torch.stack([m.last_stats.loads for m in self.moe_layers])
