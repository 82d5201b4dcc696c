"""Sharded policy: several (data, fsdp, tensor) meshes over 8 host CPU devices give the same
log-probs as one device; weights are created/loaded directly in their sharding; the chunked
log-softmax never materialises a [B, T, V] fp32 buffer (XLA compiled memory analysis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conspo_jax.models import (
    abstract_policy,
    batch_sharding,
    forward_cached,
    get_model_config,
    init_kv_cache,
    init_policy,
    make_mesh,
    policy_state_shardings,
    token_logprobs,
)
from conspo_jax.models.hf_io import load_hf_policy, save_hf_policy

# Correctness-only compiles: skip XLA's backend optimisation (halves CPU compile time).
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})
B, T = 8, 12
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 2, 4)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A 1-device policy, its checkpoint on disk, a batch and its reference log-probs."""
    model = init_policy(get_model_config("tiny-qwen2"), seed=3, dtype=jnp.float32, logprob_chunk=16)
    path = save_hf_policy(model, tmp_path_factory.mktemp("shard") / "ckpt")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 384, (B, T)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[::2, :3] = False
    mask[1::4, -2:] = False
    ids[~mask] = 0
    want = np.asarray(jax.jit(token_logprobs, **FAST)(model, jnp.asarray(ids), jnp.asarray(mask)))
    return model, path, ids, mask, want


def _sharded_logprobs(model, mesh, ids, mask):
    state_sh = policy_state_shardings(model)
    graphdef, state = nnx.split(model)
    data = batch_sharding(mesh)

    def f(state, ids, mask):
        return token_logprobs(nnx.merge(graphdef, state), ids, mask)

    fn = jax.jit(f, in_shardings=(state_sh, data, data), out_shardings=data, **FAST)
    out = fn(state, jax.device_put(ids, data), jax.device_put(mask, data))
    assert out.sharding.spec == data.spec
    return np.asarray(out)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_loaded_sharded_policy_matches_single_device(single, shape):
    model0, path, ids, mask, want = single
    mesh = make_mesh(shape)
    model = load_hf_policy(path, dtype=jnp.float32, mesh=mesh, logprob_chunk=16)
    # Weights land in their logical sharding; KV heads (2) do not divide tensor=4 -> replicated.
    q = model.layers.q[...]
    assert isinstance(q.sharding, NamedSharding) and q.sharding.mesh.shape == mesh.shape
    fsdp = "fsdp" if shape[1] > 1 else None
    tensor = "tensor" if shape[2] > 1 else None
    assert q.sharding.spec == P(None, fsdp, tensor, None)
    kv_tensor = tensor if shape[2] in (1, 2) else None
    assert model.layers.k[...].sharding.spec == P(None, fsdp, kv_tensor, None)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(model0.layers.q[...]))
    got = _sharded_logprobs(model, mesh, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_init_directly_sharded_equals_unsharded(single):
    model0 = single[0]
    mesh = make_mesh({"fsdp": 2, "tensor": 2, "data": 2})
    model = init_policy(model0.config, seed=3, dtype=jnp.float32, mesh=mesh, logprob_chunk=16)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(model0))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.lm_head[...].sharding.spec == P("fsdp", "tensor")


def test_sharded_kv_cache_prefill_matches_single_device(single):
    model0, path, ids, mask, _ = single
    mesh = make_mesh((2, 2, 2))
    model = load_hf_policy(path, dtype=jnp.float32, mesh=mesh)
    s = 16
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    kv_mask = jnp.zeros((B, s), bool).at[:, :T].set(mask)
    outs = []
    for m, mh in ((model0, None), (model, mesh)):
        cache = init_kv_cache(m.config, B, s, dtype=jnp.float32, mesh=mh)
        h, cache = jax.jit(forward_cached, **FAST)(m, ids, pos, cache, jnp.int32(0), kv_mask)
        outs.append((np.asarray(h), np.asarray(cache.k)))
    want = NamedSharding(mesh, P(None, ("data", "fsdp"), "tensor", None, None))
    assert cache.k.sharding.is_equivalent_to(want, 5)
    m = np.asarray(mask)
    np.testing.assert_allclose(outs[1][0][m], outs[0][0][m], atol=1e-5)
    np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-5)


def test_make_mesh_validates_shape():
    assert make_mesh({"tensor": 2, "fsdp": -1}).shape == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh((4, 4, 1))
    with pytest.raises(ValueError, match="unknown axes"):
        make_mesh({"model": 2})


def test_chunked_logprobs_never_hold_BxTxV_fp32():
    """Forward+backward memory of the log-prob loss stays far below one [B,T,V] fp32 buffer, while
    the unchunked configuration (one chunk) needs at least that much: the check can fail."""
    # Large vocab, small width: param-sized buffers (V*D) and attention stay small next to B*T*V.
    config = get_model_config(
        "tiny-llama", vocab_size=65536, num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64
    )
    b, t = 2, 512
    full_bytes = b * t * config.vocab_size * 4
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)

    def temp_bytes(chunk):
        graphdef, params, rest = nnx.split(
            abstract_policy(config, dtype=jnp.float32, logprob_chunk=chunk), nnx.Param, ...
        )

        def loss(params, rest, ids, mask):
            return -token_logprobs(nnx.merge(graphdef, params, rest), ids, mask).sum()

        compiled = jax.jit(jax.grad(loss), **FAST).lower(params, rest, ids, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(32)
    assert chunked < full_bytes / 4, (chunked, full_bytes)
    unchunked = temp_bytes(b * t)
    assert unchunked >= full_bytes, (unchunked, full_bytes)
