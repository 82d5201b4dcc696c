"""Parity with HF transformers (PyTorch, fp32) on tiny random checkpoints, one per family, and
checkpoint round-trips (load -> export -> transformers loads -> load again).

Alignment is layered: weights first, then final hidden states, then token log-probs with padding.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: HF parity tests need it")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from conspo_jax.base.configs import UsageError  # noqa: E402
from conspo_jax.models import hidden_states, mask_positions, token_logprobs  # noqa: E402
from conspo_jax.models.hf_io import load_hf_policy, save_hf_policy  # noqa: E402

V, T = 384, 12
COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, rope_theta=10000.0, tie_word_embeddings=False),
    "llama": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32, rope_theta=1e6, tie_word_embeddings=True),
}


def _random_hf_model(family: str):
    torch.manual_seed({"qwen2": 0, "llama": 1, "qwen3": 2}[family])
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="eager")
    with torch.no_grad():  # norms/biases start at 1/0 in HF: perturb them so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batch():
    rng = np.random.default_rng(3)
    ids = rng.integers(3, V, (3, T)).astype(np.int64)
    mask = np.ones((3, T), bool)
    mask[0, :4] = False
    mask[2, :2] = False
    mask[2, -3:] = False
    ids[~mask] = 0
    return ids, mask


def _hf_outputs(hf, ids, mask):
    pos = np.asarray(mask_positions(jnp.asarray(mask)))
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(pos, dtype=torch.int64),
            output_hidden_states=True,
        )
    logits = out.logits.double()
    logp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0]
    valid = mask[:, 1:] & mask[:, :-1]
    return out.hidden_states[-1].numpy(), np.where(valid, logp.numpy(), 0.0)


@jax.jit
def _ours(model, ids, mask):
    return hidden_states(model, ids, mask_positions(mask), mask), token_logprobs(model, ids, mask)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    hf = _random_hf_model(request.param)
    path = str(tmp_path_factory.mktemp(request.param) / "ckpt")
    hf.save_pretrained(path)
    return request.param, hf, path


def test_weights_hidden_states_and_logprobs_match_transformers(family):
    name, hf, path = family
    # qwen3 also runs attention in query blocks of 5 (3 blocks, one padded) against the reference.
    model = load_hf_policy(path, dtype=jnp.float32, logprob_chunk=16, attn_chunk=5 if name == "qwen3" else 1024)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    c = model.config
    # 1) weights, checked against independent layout formulas
    q = sd["model.layers.1.self_attn.q_proj.weight"]  # [H*Dh, D]
    np.testing.assert_array_equal(
        np.asarray(model.layers.q[...][1]), q.T.reshape(c.hidden_size, c.num_heads, c.head_dim)
    )
    o = sd["model.layers.0.self_attn.o_proj.weight"]  # [D, H*Dh]
    np.testing.assert_array_equal(
        np.asarray(model.layers.o[...][0]), o.T.reshape(c.num_heads, c.head_dim, c.hidden_size)
    )
    np.testing.assert_array_equal(np.asarray(model.layers.down[...][1]), sd["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.embed[...]), sd["model.embed_tokens.weight"])
    if name == "qwen2":
        assert c.qkv_bias and not c.tie_word_embeddings
        np.testing.assert_array_equal(
            np.asarray(model.layers.k_bias[...][0]).reshape(-1), sd["model.layers.0.self_attn.k_proj.bias"]
        )
        np.testing.assert_array_equal(np.asarray(model.lm_head[...]), sd["lm_head.weight"].T)
    if name == "qwen3":
        assert c.qk_norm and c.head_dim == 32
        np.testing.assert_array_equal(
            np.asarray(model.layers.q_norm[...][1]), sd["model.layers.1.self_attn.q_norm.weight"]
        )
    if name == "llama":
        assert c.tie_word_embeddings and c.rope_scaling_dict["rope_type"] == "llama3"
    # 2) hidden states after the final norm, 3) token log-probs, on a padded batch
    ids, mask = _batch()
    hf_h, hf_logp = _hf_outputs(hf, ids, mask)
    h, logp = _ours(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    real = mask
    np.testing.assert_allclose(np.asarray(h)[real], hf_h[real], atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(logp) - hf_logp).max() <= 1e-4
    assert np.abs(hf_logp).min() == 0 and np.abs(hf_logp).max() > 1  # non-trivial comparison


def test_export_roundtrip_is_exact_and_transformers_loads_it(family, tmp_path):
    name, hf, path = family
    model = load_hf_policy(path, dtype=jnp.float32, logprob_chunk=16)
    # Small shards force the multi-file + index layout on export.
    out = save_hf_policy(model, tmp_path / "export", max_shard_bytes=60_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == name
    again = load_hf_policy(out, dtype=jnp.float32, logprob_chunk=16)
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, model)), jax.tree.leaves(jax.tree.map(np.asarray, again))):
        np.testing.assert_array_equal(a, b)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = _batch()
    _, want = _hf_outputs(hf, ids, mask)
    _, got = _hf_outputs(hf2, ids, mask)
    np.testing.assert_array_equal(got, want)  # exported weights are bit-identical for transformers
    # Overwriting an existing export is atomic and leaves no temporary directories behind.
    save_hf_policy(again, out)
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def test_sharded_bf16_checkpoint_loads_and_reexports_bit_exact(tmp_path):
    hf = _random_hf_model("qwen2").to(torch.bfloat16)
    src = str(tmp_path / "src")
    hf.save_pretrained(src, max_shard_size="100KB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    model = load_hf_policy(src, dtype=jnp.float32)
    assert model.embed[...].dtype == jnp.float32 and model.config.torch_dtype == "bfloat16"
    out = save_hf_policy(model, tmp_path / "out")  # default: the published dtype (bf16)
    from conspo_jax.models.safetensors_io import CheckpointReader

    a, b = CheckpointReader(src), CheckpointReader(out)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        assert b.dtype(k) == a.dtype(k)
        np.testing.assert_array_equal(np.asarray(a.tensor(k)), np.asarray(b.tensor(k)))


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(UsageError, match="config.json"):
        load_hf_policy(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_hf_policy(tmp_path)
