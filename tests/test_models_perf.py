"""The GPU fast path's model pieces, on tiny models: remat policies agree, the custom-VJP LM head
matches plain autodiff and keeps [tokens, V] matmuls off fp32, weights are cast once outside the layer
scan, and causal block skipping in attention changes nothing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conspo_jax.models import REMAT_POLICIES, get_model_config, init_policy, token_logprobs
from conspo_jax.models import layers as L
from conspo_jax.models.logprobs import head_logprobs

FAST = dict(compiler_options={"xla_backend_optimization_level": 0})
VOCAB = 384


def _batch(b=3, t=13, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    mask[0, :3] = False
    mask[1, -4:] = False
    ids[~mask] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _loss_and_grad(model, ids, mask):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logp = token_logprobs(nnx.merge(graphdef, params, rest), ids, mask)
        return -logp.sum() / mask.sum(), logp

    return jax.jit(jax.value_and_grad(loss, has_aux=True), **FAST)(params)


def test_every_remat_policy_gives_the_same_logprobs_and_gradients():
    config = get_model_config("tiny-qwen2")
    ids, mask = _batch()
    results, saved = {}, {}
    for remat in REMAT_POLICIES:
        model = init_policy(config, seed=3, dtype=jnp.float32, remat=remat, logprob_chunk=8, attn_chunk=4)
        (_, logp), grads = _loss_and_grad(model, ids, mask)
        results[remat] = (np.asarray(logp), jax.tree.map(np.asarray, grads))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # The VJP closure's leaves are the residuals the forward keeps for the backward.
        pullback = jax.eval_shape(
            lambda p, g=graphdef, r=rest: jax.vjp(lambda p: token_logprobs(nnx.merge(g, p, r), ids, mask), p)[1],
            params,
        )
        saved[remat] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pullback))
    ref_logp, ref_grads = results["none"]
    for remat, (logp, grads) in results.items():
        np.testing.assert_allclose(logp, ref_logp, atol=1e-6, err_msg=remat)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            want = ref_grads
            for key in path:
                want = want[key.key] if hasattr(key, "key") else getattr(want, key.name)
            np.testing.assert_allclose(g, want, atol=1e-6, rtol=1e-5, err_msg=f"{remat} {path}")
    # The policies really differ: each keeps a different amount of the forward for the backward.
    assert saved["none"] > saved["dots"] > saved["full"], saved
    assert saved["none"] > saved["names"] > saved["full"], saved
    with pytest.raises(ValueError, match="remat='minimal'"):
        init_policy(config, remat="minimal")


def _reference_head_logprobs(h_NxBxWxD, w_DxV, tgt_NxBxW):
    """Plain autodiff over full logits: what the chunked log-softmax computed before the custom VJP."""
    logits = jnp.einsum("nbwd,dv->nbwv", h_NxBxWxD, w_DxV.astype(h_NxBxWxD.dtype), preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tgt_NxBxW[..., None], axis=-1)[..., 0]


def test_custom_vjp_head_matches_autodiff_in_fp32():
    rng = np.random.default_rng(0)
    n, b, w, d, v = 3, 2, 5, 16, 97
    h = jnp.asarray(rng.normal(size=(n, b, w, d)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, v, (n, b, w)), jnp.int32)
    g = jnp.asarray(rng.normal(size=(n, b, w)), jnp.float32)  # a non-uniform cotangent

    def vjp(fn):
        out, pullback = jax.vjp(lambda h, wt: fn(h, wt, tgt), h, wt)
        return (out, *pullback(g))

    got = jax.jit(lambda: vjp(head_logprobs))()
    want = jax.jit(lambda: vjp(_reference_head_logprobs))()
    for name, a, b_ in zip(("logp", "d_h", "d_w"), got, want, strict=True):
        assert a.dtype == b_.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, rtol=1e-5, err_msg=name)
    # bf16 compute, fp32 weight: the weight gradient comes back in fp32 and stays close.
    got16 = jax.jit(lambda: vjp(lambda h, wt, t: head_logprobs(h.astype(jnp.bfloat16), wt, t)))()
    assert got16[1].dtype == jnp.float32 and got16[2].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got16[2]), np.asarray(want[2]), atol=0.1, rtol=0.05)


_DOT = re.compile(r"stablehlo\.dot_general[^\n]*?:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)")


def f32_vocab_dots(hlo_text: str, vocab: int) -> list[str]:
    """dot_generals with an fp32 operand and a vocab-sized axis (the fp32 LM-head matmuls)."""
    bad = []
    for m in _DOT.finditer(hlo_text):
        operands = m.group(1), m.group(2)
        sizes = [int(x) for t in (*operands, m.group(3)) for x in re.findall(r"(\d+)x", t)]
        if vocab in sizes and any(t.endswith("xf32>") for t in operands):
            bad.append(m.group(0))
    return bad


def test_bf16_backward_has_no_fp32_vocab_dot():
    config = get_model_config("tiny-qwen2", vocab_size=1000)  # a vocab size no other axis has
    model = init_policy(config, seed=0, dtype=jnp.bfloat16, remat="names", logprob_chunk=16)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 1000, (2, 12)), jnp.int32)
    mask = jnp.ones((2, 12), bool)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        return -token_logprobs(nnx.merge(graphdef, params, rest), ids, mask).sum()

    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    vocab_dots = [m.group(0) for m in _DOT.finditer(text) if "1000x" in m.group(0)]
    assert f32_vocab_dots(text, 1000) == []
    assert len(vocab_dots) >= 4, vocab_dots  # forward, recompute, d_h, d_w
    # The detector does fire on an fp32 head (same program, fp32 compute).
    model32 = init_policy(config, seed=0, dtype=jnp.float32, logprob_chunk=16)
    g32, p32, r32 = nnx.split(model32, nnx.Param, ...)
    text32 = jax.jit(jax.grad(lambda p: -token_logprobs(nnx.merge(g32, p, r32), ids, mask).sum())).lower(p32)
    assert f32_vocab_dots(text32.as_text(), 1000)


def _scan_bodies(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn.params["jaxpr"].jaxpr
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _scan_bodies(sub)


def _converts(jaxpr, shapes):
    """convert_element_type eqns (recursively) whose operand has one of `shapes`."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type" and tuple(eqn.invars[0].aval.shape) in shapes:
            out.append(eqn)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            out.extend(_converts(sub, shapes))
    return out


def test_layer_weights_are_cast_once_outside_the_scan():
    model = init_policy(get_model_config("tiny-qwen2"), seed=0, dtype=jnp.bfloat16, remat="full")
    ids, mask = _batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        return token_logprobs(nnx.merge(graphdef, params, rest), ids, mask).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    stacked = {tuple(w.shape) for w in model.layers.arrays().values()}
    per_layer = {s[1:] for s in stacked}
    layer_scans = [j for j in _scan_bodies(jaxpr) if any(tuple(v.aval.shape) in per_layer for v in j.invars)]
    assert layer_scans, "no scan over the layer weights found"
    assert [e for j in layer_scans for e in _converts(j, per_layer)] == []
    # Outside: one fp32 -> bf16 cast per stacked weight (forward) and one back (its gradient).
    outer = [e for e in jaxpr.eqns if e.primitive.name == "convert_element_type"]
    assert len([e for e in outer if tuple(e.invars[0].aval.shape) in stacked]) == 2 * len(model.layers.arrays())


def test_causal_block_skipping_equals_the_dense_masked_blocks():
    rng = np.random.default_rng(4)
    b, t, h, k, e = 2, 11, 4, 2, 8
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, n, e)), jnp.float32) for n in (h, k, k))
    valid = jnp.asarray(rng.random((b, t)) > 0.2)
    seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 5], b, axis=0), jnp.int32)
    kw = dict(q_slot_T=jnp.arange(t), kv_valid_BxS=valid, q_seg_BxT=seg, kv_seg_BxS=seg, self_visible=True)
    want = L.slot_attention(q, kk, v, q_chunk=t, **kw)  # one block, no skipping
    for chunk in (3, 4):
        got = jax.jit(
            lambda q, kk, v, c=chunk: L.slot_attention(q, kk, v, q_chunk=c, causal_prefix=True, **kw), **FAST
        )(q, kk, v)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    with pytest.raises(ValueError, match="causal_prefix"):
        L.slot_attention(
            q, kk[:, :-1], v[:, :-1], q_chunk=3, causal_prefix=True, **{**kw, "kv_valid_BxS": valid[:, :-1]}
        )
