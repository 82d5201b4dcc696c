"""The policy network: a decoder-only transformer (Qwen2 / Llama / Qwen3) as a Flax NNX module.

Layer weights are stacked along a leading [L] axis and the stack runs under `jax.lax.scan` (one
compiled layer, fast compiles for 28-36 layer models) with optional `jax.checkpoint`. Every weight
carries `logical_axes` metadata that `sharding.state_shardings` turns into NamedShardings.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from conspo_jax.models import layers as L
from conspo_jax.models.config import ModelConfig
from conspo_jax.models.sharding import constrain, state_shardings


def layer_param_specs(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """name -> (per-layer shape, logical axes, init) of every stacked layer weight of `c`."""
    d, f, h, k, dh = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    specs = {
        "attn_norm": ((d,), ("norm",), "ones"),
        "q": ((d, h, dh), ("embed", "heads", "head_dim"), "normal"),
        "k": ((d, k, dh), ("embed", "kv_heads", "head_dim"), "normal"),
        "v": ((d, k, dh), ("embed", "kv_heads", "head_dim"), "normal"),
        "o": ((h, dh, d), ("heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ((d,), ("norm",), "ones"),
        "gate": ((d, f), ("embed", "mlp"), "normal"),
        "up": ((d, f), ("embed", "mlp"), "normal"),
        "down": ((f, d), ("mlp", "embed"), "normal"),
    }
    if c.qkv_bias:
        specs["q_bias"] = ((h, dh), ("heads", "head_dim"), "zeros")
        specs["k_bias"] = ((k, dh), ("kv_heads", "head_dim"), "zeros")
        specs["v_bias"] = ((k, dh), ("kv_heads", "head_dim"), "zeros")
    if c.qk_norm:
        specs["q_norm"] = ((dh,), ("norm",), "ones")
        specs["k_norm"] = ((dh,), ("norm",), "ones")
    return specs


# Below this many random weights, all of them come from ONE normal draw that is then sliced: XLA's
# CPU compile time grows with every RNG op (~1 s each on a busy CPU), while a model this small costs
# nothing extra to materialise flat. Larger models draw per weight to avoid the transient copy.
_FLAT_INIT_MAX = 1 << 26


class _Init:
    """Produces initial values for a list of weight specs from one `nnx.Rngs` stream."""

    def __init__(self, rngs: nnx.Rngs, specs, std: float, dtype):
        self.std, self.dtype = std, dtype
        sizes = [math.prod(shape) for shape, init in specs if init == "normal"]
        self.flat = None
        if sum(sizes) <= _FLAT_INIT_MAX:
            self.flat = std * jax.random.normal(rngs.params(), (sum(sizes),), jnp.float32)
            self.offset = 0
        self.rngs = rngs

    def __call__(self, shape, init: str):
        if init == "ones":
            return jnp.ones(shape, self.dtype)
        if init == "zeros":
            return jnp.zeros(shape, self.dtype)
        if self.flat is None:
            return (self.std * jax.random.normal(self.rngs.params(), shape, jnp.float32)).astype(self.dtype)
        n = math.prod(shape)
        out = self.flat[self.offset : self.offset + n].reshape(shape).astype(self.dtype)
        self.offset += n
        return out


def _param(value, axes) -> nnx.Param:
    # eager_sharding=False: placement comes from `state_shardings` at jit time, not at construction.
    return nnx.Param(value, logical_axes=tuple(axes), eager_sharding=False)


def _all_specs(c: ModelConfig):
    """(owner, name, shape, logical axes, init) of every weight, in creation order."""
    out = [("model", "embed", (c.vocab_size, c.hidden_size), ("vocab", "embed"), "normal")]
    for name, (shape, axes, init) in layer_param_specs(c).items():
        out.append(("layers", name, (c.num_layers, *shape), ("layers", *axes), init))
    out.append(("model", "final_norm", (c.hidden_size,), ("norm",), "ones"))
    if not c.tie_word_embeddings:
        out.append(("model", "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), "normal"))
    return out


class Layers(nnx.Module):
    """All decoder layers' weights, each an nnx.Param of shape [L, ...] (LoRA adapters, an nnx.Param
    subclass, included: see conspo_jax/models/lora.py)."""

    def __init__(self, values: dict[str, nnx.Param]):
        for name, param in values.items():
            setattr(self, name, param)

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in vars(self) if isinstance(getattr(self, name), nnx.Param)}


class Transformer(nnx.Module):
    """Causal LM policy.

    Options are static attributes that travel in the graphdef, so `nnx.merge(graphdef, state)` inside
    a jitted loss restores them: dtype (compute), param_dtype, remat (one of layers.REMAT_POLICIES),
    logprob_chunk (tokens per log-softmax chunk), attn_impl ('auto' = cuDNN flash attention on GPU in
    bf16/fp16, else XLA), attn_chunk (query block of masked XLA attention), mesh.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        remat: str = "none",
        logprob_chunk: int = 2048,
        attn_impl: str = "auto",
        attn_chunk: int = 1024,
        mesh: Mesh | None = None,
    ):
        if attn_impl not in ("auto", "xla", "cudnn"):
            raise ValueError(f"attn_impl={attn_impl!r} not supported; expected 'auto', 'xla' or 'cudnn'")
        L.maybe_remat(lambda x: x, remat)  # validates the name
        if int(logprob_chunk) < 1:
            raise ValueError(f"logprob_chunk={logprob_chunk!r} must be a positive int")
        if int(attn_chunk) < 1:
            raise ValueError(f"attn_chunk={attn_chunk!r} must be a positive int")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.remat = remat
        self.logprob_chunk = int(logprob_chunk)
        self.attn_impl = attn_impl
        self.attn_chunk = int(attn_chunk)
        self.mesh = mesh
        # A LoRAConfig once conspo_jax.models.lora.attach_lora has added adapters (static: the layer
        # code reads the scale from it under jit).
        self.lora = None
        specs = _all_specs(config)
        make = _Init(rngs, [(shape, init) for _, _, shape, _, init in specs], config.initializer_range, param_dtype)
        layer_params = {}
        for owner, name, shape, axes, init in specs:
            param = _param(make(shape, init), axes)
            if owner == "layers":
                layer_params[name] = param
            else:
                setattr(self, name, param)
        self.layers = Layers(layer_params)

    # ------------------------------------------------------------------ helpers used by all paths
    def resolved_attn_impl(self) -> str:
        if self.attn_impl != "auto":
            return self.attn_impl
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and self.dtype in (jnp.bfloat16, jnp.float16) else "xla"

    def embed_tokens(self, input_ids_BxT: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], input_ids_BxT, axis=0).astype(self.dtype)
        return constrain(x, self.mesh, ("batch", "seq", "act_embed"))

    def head_weight(self) -> jax.Array:
        """LM head as [D, V] in the compute dtype (the transposed embedding when tied)."""
        return self.head_weight_param().astype(self.dtype)

    def head_weight_param(self) -> jax.Array:
        """LM head as [D, V] in the parameter dtype (the chunked log-prob casts it once itself)."""
        return self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def final_hidden(self, x_BxTxD: jax.Array) -> jax.Array:
        return L.rms_norm(x_BxTxD, self.final_norm[...], self.config.rms_norm_eps)


def compute_layer_params(model: Transformer) -> dict[str, jax.Array]:
    """The stacked [L, ...] layer weights in the compute dtype, cast once for the whole stack.

    Casting here, before the layer scan, means one convert per weight per pass (and its transpose in
    the backward) instead of one per layer inside the scanned body, where remat would repeat it in the
    backward's recomputation. Norm weights are cast too: rms_norm multiplies in the activations' dtype.
    """
    return {name: w.astype(model.dtype) for name, w in model.layers.arrays().items()}


def project(model: Transformer, p: dict[str, jax.Array], name: str, x, equation: str):
    """x through layer weight `name` (`equation`, an einsum), plus its LoRA path when the layer has
    adapters `{name}_lora_a` / `{name}_lora_b`. Without adapters this is exactly the plain einsum; with
    B = 0 the low-rank term is exactly +0, so the output is bitwise the base model's."""
    dt = model.dtype
    # astype is free when the caller already cast the weights (compute_layer_params).
    y = jnp.einsum(equation, x, p[name].astype(dt))
    a = p.get(name + "_lora_a")
    if a is not None:
        y = y + L.lora_delta(x, a.astype(dt), p[name + "_lora_b"].astype(dt), model.lora.scale)
    return y


def qkv_projection(model: Transformer, p: dict[str, jax.Array], x_BxTxD, cos, sin):
    """Pre-norm + Q/K/V projections (+ bias, + q/k norm) + RoPE for one layer."""
    c, dt = model.config, model.dtype
    h = L.rms_norm(x_BxTxD, p["attn_norm"], c.rms_norm_eps)
    q = project(model, p, "q", h, "btd,dnh->btnh")
    k = project(model, p, "k", h, "btd,dnh->btnh")
    v = project(model, p, "v", h, "btd,dnh->btnh")
    if c.qkv_bias:
        q, k, v = q + p["q_bias"].astype(dt), k + p["k_bias"].astype(dt), v + p["v_bias"].astype(dt)
    q, k, v = checkpoint_name(q, "query_proj"), checkpoint_name(k, "key_proj"), checkpoint_name(v, "value_proj")
    if c.qk_norm:
        q = L.rms_norm(q, p["q_norm"], c.rms_norm_eps)
        k = L.rms_norm(k, p["k_norm"], c.rms_norm_eps)
    q = constrain(L.apply_rope(q, cos, sin), model.mesh, ("batch", "seq", "act_heads", None))
    k = constrain(L.apply_rope(k, cos, sin), model.mesh, ("batch", "seq", "act_kv_heads", None))
    v = constrain(v, model.mesh, ("batch", "seq", "act_kv_heads", None))
    return q, k, v


def attn_output_and_mlp(model: Transformer, p: dict[str, jax.Array], x_BxTxD, o_BxTxHxE):
    """Output projection + residual, then pre-norm SwiGLU + residual."""
    c, dt = model.config, model.dtype
    o_BxTxHxE = checkpoint_name(o_BxTxHxE.astype(dt), "context")
    x = x_BxTxD + checkpoint_name(project(model, p, "o", o_BxTxHxE, "btnh,nhd->btd"), "out_proj")
    x = constrain(x, model.mesh, ("batch", "seq", "act_embed"))
    h_BxTxD = L.rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
    g_BxTxF = checkpoint_name(project(model, p, "gate", h_BxTxD, "btd,df->btf"), "mlp_gate")
    u_BxTxF = checkpoint_name(project(model, p, "up", h_BxTxD, "btd,df->btf"), "mlp_up")
    x = x + project(model, p, "down", jax.nn.silu(g_BxTxF) * u_BxTxF, "btf,fd->btd")
    return constrain(x, model.mesh, ("batch", "seq", "act_embed"))


def hidden_states(
    model: Transformer,
    input_ids_BxT,
    positions_BxT,
    attention_mask_BxT=None,
    *,
    segment_ids_BxT=None,
    right_aligned_lengths_B=None,
) -> jax.Array:
    """Final-norm hidden states [B, T, D] of a full (no-cache) causal forward pass.

    Keys are limited to real tokens (`attention_mask`) and, for packed rows, to the query's segment.
    With `right_aligned_lengths` instead, row b's real tokens are exactly its first lengths[b] slots:
    attention then needs no mask at all (the cuDNN flash-attention form).
    """
    impl = model.resolved_attn_impl()
    cos, sin = L.rope_tables(model.config, positions_BxT)
    b, t = input_ids_BxT.shape
    if right_aligned_lengths_B is None and attention_mask_BxT is None:
        attention_mask_BxT = jnp.ones((b, t), bool)

    def attend(q, k, v):
        if right_aligned_lengths_B is not None:
            return L.attention(q, k, v, causal=True, lengths=right_aligned_lengths_B, implementation=impl)
        return L.slot_attention(
            q,
            k,
            v,
            q_slot_T=jnp.arange(t, dtype=jnp.int32),
            kv_valid_BxS=attention_mask_BxT.astype(bool),
            q_seg_BxT=segment_ids_BxT,
            kv_seg_BxS=segment_ids_BxT,
            self_visible=True,
            q_chunk=model.attn_chunk,
            causal_prefix=True,
        )

    def layer(x, p):
        q, k, v = qkv_projection(model, p, x, cos, sin)
        return attn_output_and_mlp(model, p, x, attend(q, k, v)), None

    x = model.embed_tokens(input_ids_BxT)
    x, _ = jax.lax.scan(L.maybe_remat(layer, model.remat), x, compute_layer_params(model))
    return model.final_hidden(x)


def policy_logits(model: Transformer, h_BxTxD: jax.Array) -> jax.Array:
    """fp32 logits [B, T, V] through the (tied or untied) LM head. Materialises [B, T, V]: use it for
    sampling (T small); `token_logprobs` computes log-probs in chunks instead."""
    logits = jnp.einsum(
        "btd,dv->btv", h_BxTxD.astype(model.dtype), model.head_weight(), preferred_element_type=jnp.float32
    )
    return constrain(logits, model.mesh, ("batch", "seq", "act_vocab"))


def _build(config, seed, kwargs) -> Transformer:
    return Transformer(config, rngs=nnx.Rngs(params=seed), **kwargs)


def abstract_policy(config: ModelConfig, **kwargs) -> Transformer:
    """Shape-only policy (no memory allocated): for shardings and for loading weights into."""
    return nnx.eval_shape(lambda: _build(config, 0, kwargs))


def init_policy(
    config: ModelConfig,
    *,
    seed: int = 0,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    mesh: Mesh | None = None,
    remat: str = "none",
    logprob_chunk: int = 2048,
    attn_impl: str = "auto",
    attn_chunk: int = 1024,
) -> Transformer:
    """Randomly initialised policy. With `mesh`, every weight is created directly in its sharding
    (eval_shape -> shardings -> jit(init, out_shardings)), so no unsharded copy ever exists."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"init_policy config must be a ModelConfig, got {type(config).__name__}")
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        logprob_chunk=logprob_chunk,
        attn_impl=attn_impl,
        attn_chunk=attn_chunk,
        mesh=mesh,
    )
    graphdef, abs_state = nnx.split(abstract_policy(config, **kwargs))
    out_shardings = state_shardings(abs_state, mesh) if mesh is not None else None

    init_state = jax.jit(lambda: nnx.state(_build(config, seed, kwargs)), out_shardings=out_shardings)
    return nnx.merge(graphdef, init_state())


def policy_state_shardings(model: Transformer, mesh: Mesh | None = None):
    """NamedShardings matching `nnx.state(model)` (for jit in/out shardings in the trainer)."""
    mesh = mesh if mesh is not None else model.mesh
    if mesh is None:
        raise ValueError("policy_state_shardings needs a mesh (the policy has none)")
    return state_shardings(nnx.state(model), mesh)
