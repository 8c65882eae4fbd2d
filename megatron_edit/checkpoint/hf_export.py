"""megatron-core GPT state dict (TP 1, PP 1, global layer names) -> Hugging Face GPT-2 or Llama.

Two architectures map one to one onto megatron-core's GPTModel:
- GPT-2: LayerNorm, learned absolute positions, GELU MLP, multi-head attention (biases may be absent:
  then they are zeros), tied or untied output layer;
- Llama: RMSNorm, rotary positions (non-interleaved, as megatron-core's default), SwiGLU MLP, grouped
  query attention, no biases (or attention / MLP biases).
Anything else (e.g. LayerNorm with rotary positions) is refused with the reason. The fused QKV weight is
megatron-core's per-group layout [groups, (heads per group) q + k + v, head dim, hidden]; GPT-2's c_attn is
[q | k | v] with Conv1D (transposed) weights; SwiGLU's fc1 is [gate; up].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


class ExportError(ValueError):
    """The model cannot be expressed in the requested Hugging Face architecture."""


@dataclass
class ModelShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int  # padded, as the checkpoint's embedding
    max_position_embeddings: int
    normalization: str
    swiglu: bool
    position_embedding_type: str
    rotary_base: int
    tied: bool
    eps: float = 1e-5

    @classmethod
    def from_args(cls, args, vocab_size: int) -> "ModelShape":
        return cls(
            num_layers=args.num_layers, hidden_size=args.hidden_size,
            ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups or args.num_attention_heads,
            vocab_size=vocab_size, max_position_embeddings=args.max_position_embeddings,
            normalization=args.normalization, swiglu=args.swiglu,
            position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
            tied=not args.untie_embeddings_and_output_weights,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def choose_architecture(shape: ModelShape, requested: Optional[str] = None) -> str:
    gpt2 = (shape.normalization == "LayerNorm" and shape.position_embedding_type == "learned_absolute"
            and not shape.swiglu and shape.num_query_groups == shape.num_attention_heads)
    llama = shape.normalization == "RMSNorm" and shape.position_embedding_type == "rope" and shape.swiglu
    if requested == "gpt2" and not gpt2:
        raise ExportError("--hf-architecture gpt2 needs LayerNorm, learned absolute positions, a GELU MLP and "
                          "multi-head attention (no --num-query-groups)")
    if requested == "llama" and not llama:
        raise ExportError("--hf-architecture llama needs --normalization RMSNorm, --position-embedding-type rope "
                          "and --swiglu")
    if requested:
        return requested
    if gpt2:
        return "gpt2"
    if llama:
        return "llama"
    raise ExportError(
        f"no Hugging Face architecture matches normalization={shape.normalization}, "
        f"positions={shape.position_embedding_type}, swiglu={shape.swiglu}: GPT-2 needs LayerNorm + learned "
        "absolute positions + GELU, Llama needs RMSNorm + rope + SwiGLU")


def _get(state: dict, *names: str) -> Optional[torch.Tensor]:
    for name in names:
        if name in state:
            return state[name]
    return None


def _norm(state: dict, layer: int, which: str):
    """Local spec: input_layernorm / pre_mlp_layernorm; Transformer Engine spec: fused into the linear."""
    p = f"decoder.layers.{layer}."
    fused = "self_attention.linear_qkv" if which == "input" else "mlp.linear_fc1"
    plain = "input_layernorm" if which == "input" else "pre_mlp_layernorm"
    weight = _get(state, p + plain + ".weight", p + fused + ".layer_norm_weight")
    bias = _get(state, p + plain + ".bias", p + fused + ".layer_norm_bias")
    return weight, bias


def _split_qkv(weight: torch.Tensor, shape: ModelShape):
    """[groups * (q_per_group + 2) * head_dim, ...] -> q [heads * hd, ...], k, v [groups * hd, ...]."""
    g, hd = shape.num_query_groups, shape.head_dim
    per = shape.num_attention_heads // g
    w = weight.reshape(g, per + 2, hd, *weight.shape[1:])
    q = w[:, :per].reshape(g * per * hd, *weight.shape[1:])
    k = w[:, per].reshape(g * hd, *weight.shape[1:])
    v = w[:, per + 1].reshape(g * hd, *weight.shape[1:])
    return q, k, v


def _zeros_like_rows(weight: torch.Tensor) -> torch.Tensor:
    return torch.zeros(weight.shape[0], dtype=weight.dtype)


def to_gpt2(state: dict, shape: ModelShape) -> dict:
    out = {
        "transformer.wte.weight": state["embedding.word_embeddings.weight"],
        "transformer.wpe.weight": state["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": state["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": state["decoder.final_layernorm.bias"],
    }
    for i in range(shape.num_layers):
        p, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        ln1_w, ln1_b = _norm(state, i, "input")
        ln2_w, ln2_b = _norm(state, i, "mlp")
        qkv_w = state[p + "self_attention.linear_qkv.weight"]
        qkv_b = _get(state, p + "self_attention.linear_qkv.bias")
        q, k, v = _split_qkv(qkv_w, shape)
        if qkv_b is None:
            qkv_b = _zeros_like_rows(qkv_w)
        qb, kb, vb = _split_qkv(qkv_b, shape)
        proj_w = state[p + "self_attention.linear_proj.weight"]
        fc1_w = state[p + "mlp.linear_fc1.weight"]
        fc2_w = state[p + "mlp.linear_fc2.weight"]
        out.update({
            h + "ln_1.weight": ln1_w, h + "ln_1.bias": ln1_b,
            h + "ln_2.weight": ln2_w, h + "ln_2.bias": ln2_b,
            # Conv1D stores [in, out]: the transpose of a Linear weight.
            h + "attn.c_attn.weight": torch.cat([q, k, v], dim=0).t().contiguous(),
            h + "attn.c_attn.bias": torch.cat([qb, kb, vb], dim=0),
            h + "attn.c_proj.weight": proj_w.t().contiguous(),
            h + "attn.c_proj.bias": _get(state, p + "self_attention.linear_proj.bias")
            if _get(state, p + "self_attention.linear_proj.bias") is not None else _zeros_like_rows(proj_w),
            h + "mlp.c_fc.weight": fc1_w.t().contiguous(),
            h + "mlp.c_fc.bias": _get(state, p + "mlp.linear_fc1.bias")
            if _get(state, p + "mlp.linear_fc1.bias") is not None else _zeros_like_rows(fc1_w),
            h + "mlp.c_proj.weight": fc2_w.t().contiguous(),
            h + "mlp.c_proj.bias": _get(state, p + "mlp.linear_fc2.bias")
            if _get(state, p + "mlp.linear_fc2.bias") is not None else _zeros_like_rows(fc2_w),
        })
    out["lm_head.weight"] = state["embedding.word_embeddings.weight"] if shape.tied else state["output_layer.weight"]
    return out


def gpt2_config(shape: ModelShape) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": shape.vocab_size,
        "n_positions": shape.max_position_embeddings, "n_embd": shape.hidden_size, "n_layer": shape.num_layers,
        "n_head": shape.num_attention_heads, "n_inner": shape.ffn_hidden_size,
        "activation_function": "gelu",  # megatron-core's default is the exact (erf) GELU
        "layer_norm_epsilon": shape.eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": shape.tied, "bos_token_id": None, "eos_token_id": None,
    }


def to_llama(state: dict, shape: ModelShape) -> dict:
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
        "lm_head.weight": state["embedding.word_embeddings.weight"] if shape.tied else state["output_layer.weight"],
    }
    for i in range(shape.num_layers):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv(state[p + "self_attention.linear_qkv.weight"], shape)
        gate, up = state[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            h + "input_layernorm.weight": _norm(state, i, "input")[0],
            h + "post_attention_layernorm.weight": _norm(state, i, "mlp")[0],
            h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
            h + "self_attn.o_proj.weight": state[p + "self_attention.linear_proj.weight"],
            h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": state[p + "mlp.linear_fc2.weight"],
        })
        qkv_b = _get(state, p + "self_attention.linear_qkv.bias")
        if qkv_b is not None:
            qb, kb, vb = _split_qkv(qkv_b, shape)
            out.update({h + "self_attn.q_proj.bias": qb, h + "self_attn.k_proj.bias": kb,
                        h + "self_attn.v_proj.bias": vb,
                        h + "self_attn.o_proj.bias": state[p + "self_attention.linear_proj.bias"]})
        fc1_b = _get(state, p + "mlp.linear_fc1.bias")
        if fc1_b is not None:
            gb, ub = fc1_b.chunk(2, dim=0)
            out.update({h + "mlp.gate_proj.bias": gb, h + "mlp.up_proj.bias": ub,
                        h + "mlp.down_proj.bias": state[p + "mlp.linear_fc2.bias"]})
    return out


def llama_config(shape: ModelShape, has_bias: bool) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size, "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups, "head_dim": shape.head_dim, "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings, "rms_norm_eps": shape.eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(shape.rotary_base)},
        "rope_theta": float(shape.rotary_base), "attention_bias": has_bias, "mlp_bias": has_bias,
        "tie_word_embeddings": shape.tied, "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None,
    }


def export(state: dict, shape: ModelShape, architecture: str) -> tuple[dict, dict]:
    """(Hugging Face tensors, config.json dict); tensors contiguous and unshared (safetensors needs it)."""
    if architecture == "gpt2":
        tensors, config = to_gpt2(state, shape), gpt2_config(shape)
    else:
        has_bias = any(k.endswith("linear_qkv.bias") for k in state)
        tensors, config = to_llama(state, shape), llama_config(shape, has_bias)
    if shape.tied:
        # Hugging Face re-ties lm_head to the input embedding at load; safetensors refuses shared storage.
        tensors.pop("lm_head.weight")
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}, config
