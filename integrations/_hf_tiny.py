"""Small random-model configurations of the supported architectures (tests, examples, benchmarks: no hub)."""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------------------------------------------------
# tiny configurations (tests, examples, benchmarks: no hub needed)
# ---------------------------------------------------------------------------------------------------------

_TINY = {
    "mixtral": lambda I, E, k: dict(intermediate_size=I, num_local_experts=E, num_experts_per_tok=k),
    "qwen2_moe": lambda I, E, k: dict(
        intermediate_size=2 * I,
        moe_intermediate_size=I,
        num_experts=E,
        shared_expert_intermediate_size=I,
        num_experts_per_tok=k,
        norm_topk_prob=False,
    ),
    "qwen3_moe": lambda I, E, k: dict(
        intermediate_size=2 * I,
        moe_intermediate_size=I,
        num_experts=E,
        num_experts_per_tok=k,
        norm_topk_prob=True,
        head_dim=16,
    ),
    "olmoe": lambda I, E, k: dict(
        intermediate_size=I, num_experts=E, num_experts_per_tok=k, eos_token_id=1, pad_token_id=0, bos_token_id=None
    ),
    "gpt_oss": lambda I, E, k: dict(
        intermediate_size=I, num_local_experts=E, num_experts_per_tok=k, head_dim=16, sliding_window=16
    ),
    "deepseek_v3": lambda I, E, k: dict(
        intermediate_size=2 * I,
        moe_intermediate_size=I,
        n_routed_experts=E,
        num_experts_per_tok=k,
        n_group=E // 2 if E % 2 == 0 else 1,
        topk_group=max(1, E // 4),
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        v_head_dim=16,
        qk_nope_head_dim=8,
        n_shared_experts=1,
    ),
}


def tiny_config(
    model_type: str,
    *,
    hidden: int = 64,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    ffn: int = 32,
    vocab: int = 256,
    **overrides: Any,
) -> Any:
    """A small random-model config of ``model_type`` ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss",
    "deepseek_v3") for ``AutoModelForCausalLM.from_config``: ``hidden`` wide, ``layers`` MoE layers of
    ``experts`` experts (``ffn`` inner width), top-``top_k``, 4 heads."""
    from transformers import AutoConfig

    if model_type not in _TINY:
        raise ValueError(f"`model_type` must be one of {sorted(_TINY)}, got {model_type!r}")
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    kw.update(_TINY[model_type](ffn, experts, top_k))
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)
