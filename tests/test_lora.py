"""LoRA on the policy (conspo_jax/models/lora.py, peft_io.py): a fresh adapter is the base model, the
adapter gradient is the full-weight gradient through the chain rule, merged and applied adapters sample
the same tokens, the PEFT export is what peft computes, only the adapters train, and bad settings are
named. Every test perturbs B where B = 0 would make the check vacuous.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conspo_jax.base.configs import UsageError
from conspo_jax.models import (
    LoRAConfig,
    LoRAParam,
    attach_lora,
    get_model_config,
    hidden_states,
    init_policy,
    make_mesh,
    mask_positions,
    merge_lora,
    merged_policy,
    plain_graphdef,
    policy_logits,
    split_trainable,
    state_shardings,
    token_logprobs,
)
from conspo_jax.models.lora import LORA_TARGETS, adapter_state, count_lora_params, state_nbytes
from conspo_jax.rollout import SamplingParams
from conspo_jax.rollout.jax_engine import JaxEngine

V = 384
FAST = {"xla_backend_optimization_level": 0}


def _batch(b=3, t=12, seed=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    mask[0, :4] = False  # left padding
    mask[-1, -3:] = False  # right padding
    ids[~mask] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _perturb_b(model, std=0.05, seed=7):
    """Random nonzero B on every adapter (a fresh one is 0, which hides layout and scale mistakes)."""
    for i, t in enumerate(model.lora.targets):
        var = getattr(model.layers, f"{t}_lora_b")
        var[...] = std * jax.random.normal(jax.random.key(seed + i), var.shape, var[...].dtype)
    return model


def _lora_policy(name="tiny-qwen2", rank=4, alpha=8.0, targets=LORA_TARGETS, dtype=jnp.float32, perturb=True):
    model = init_policy(get_model_config(name), seed=1, dtype=dtype)
    attach_lora(model, LoRAConfig(rank=rank, alpha=alpha, targets=targets), seed=2)
    return _perturb_b(model) if perturb else model


@jax.jit
def _logprobs(model, ids, mask):
    return token_logprobs(model, ids, mask)


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("name, dtype", [("tiny-qwen2", jnp.float32), ("tiny-qwen3", jnp.bfloat16)])
def test_fresh_adapters_give_the_base_logprobs_bitwise(name, dtype):
    # B = 0 makes the low-rank term (x A) 0 = +0 exactly, and y + 0 = y in IEEE arithmetic; the base
    # einsums are the same ops as without adapters, so the log-probs must be bitwise equal (bf16 too).
    model = init_policy(get_model_config(name), seed=1, dtype=dtype)
    ids, mask = _batch()
    base = np.asarray(_logprobs(model, ids, mask))
    attach_lora(model, LoRAConfig(rank=4, alpha=8.0), seed=2)
    adapters = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(model, LoRAParam))}
    assert adapters == {f"{t}_lora_{s}" for t in LORA_TARGETS for s in "ab"}
    np.testing.assert_array_equal(np.asarray(_logprobs(model, ids, mask)), base)
    # ... and the adapters are live: a nonzero B moves them.
    _perturb_b(model)
    assert np.abs(np.asarray(_logprobs(model, ids, mask)) - base).max() > 1e-2


def test_merged_weights_give_the_applied_logprobs():
    model = _lora_policy("tiny-qwen2")
    ids, mask = _batch()
    applied = np.asarray(_logprobs(model, ids, mask))
    merged = merged_policy(model)
    assert merged.lora is None and not nnx.state(merged, LoRAParam)
    # fp32 both ways; only the association of W x + s (x A) B vs (W + s A B) x differs.
    np.testing.assert_allclose(np.asarray(_logprobs(merged, ids, mask)), applied, atol=2e-5, rtol=0)
    # merge_lora is pure: the LoRA policy still has its adapters and its own base weights.
    assert model.lora is not None and nnx.state(model, LoRAParam)
    assert not np.array_equal(np.asarray(merged.layers.q[...]), np.asarray(model.layers.q[...]))


# ------------------------------------------------------------------------------------------ gradients
def test_adapter_gradients_are_the_full_weight_gradient_through_the_chain_rule():
    model = _lora_policy("tiny-qwen2", targets=("q", "o", "down"))  # one attention-in, one head-in, one MLP-in
    ids, mask = _batch()
    w_BxT = jnp.asarray(np.random.default_rng(0).normal(size=(ids.shape[0], ids.shape[1] - 1)), jnp.float32)
    graphdef, lora, frozen = split_trainable(model)
    plain_gd = plain_graphdef(model)

    def applied(lora):
        return jnp.sum(w_BxT * token_logprobs(nnx.merge(graphdef, lora, frozen), ids, mask))

    def merged(lora):  # the merged form W + s A B, differentiated w.r.t. A and B
        state = merge_lora(nnx.merge_state(lora, frozen))
        return jnp.sum(w_BxT * token_logprobs(nnx.merge(plain_gd, state), ids, mask))

    g_applied = nnx.to_flat_state(jax.jit(jax.grad(applied))(lora))
    g_merged = dict(nnx.to_flat_state(jax.jit(jax.grad(merged))(lora)))
    for path, g in g_applied:
        np.testing.assert_allclose(np.asarray(g[...]), np.asarray(g_merged[path][...]), rtol=2e-4, atol=1e-6)

    # And explicitly: with G = dL/dW at the merged weights, dL/dA = s G B^T and dL/dB = s A^T G.
    plain_gd, plain_params, plain_rest = nnx.split(merged_policy(model), nnx.Param, ...)

    def full(params):
        return jnp.sum(w_BxT * token_logprobs(nnx.merge(plain_gd, params, plain_rest), ids, mask))

    g_full = jax.jit(jax.grad(full))(plain_params)
    s, r = model.lora.scale, model.lora.rank
    grads = dict(g_applied)
    for t in model.lora.targets:
        a = np.asarray(getattr(model.layers, f"{t}_lora_a")[...], np.float64)
        b = np.asarray(getattr(model.layers, f"{t}_lora_b")[...], np.float64)
        n_layers = a.shape[0]
        G = np.asarray(g_full["layers"][t][...], np.float64).reshape(n_layers, a[0].size // r, -1)
        a, b = a.reshape(n_layers, -1, r), b.reshape(n_layers, r, -1)
        want_a = s * np.einsum("lio,lro->lir", G, b)
        want_b = s * np.einsum("lir,lio->lro", a, G)
        got_a = np.asarray(grads[("layers", f"{t}_lora_a")][...]).reshape(want_a.shape)
        got_b = np.asarray(grads[("layers", f"{t}_lora_b")][...]).reshape(want_b.shape)
        assert np.abs(want_a).max() > 1e-4 and np.abs(want_b).max() > 1e-4  # not a comparison of zeros
        np.testing.assert_allclose(got_a, want_a, rtol=2e-4, atol=1e-6 * np.abs(want_a).max())
        np.testing.assert_allclose(got_b, want_b, rtol=2e-4, atol=1e-6 * np.abs(want_b).max())


def test_only_the_adapters_train():
    from conspo_jax.train.step import make_optimizer

    model = _lora_policy("tiny-qwen2", perturb=False)  # B = 0: the first step can move B only
    ids, mask = _batch()
    before = {p: (isinstance(v, LoRAParam), np.asarray(v[...])) for p, v in nnx.to_flat_state(nnx.state(model))}
    graphdef, lora, frozen = split_trainable(model)
    paths = {p for p, _ in nnx.to_flat_state(lora)}
    assert paths == {("layers", f"{t}_lora_{s}") for t in LORA_TARGETS for s in "ab"}  # no base weight
    assert all(not isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(frozen))
    opt = make_optimizer(1e-2, warmup_steps=0, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    opt_state = opt.init(lora)

    @jax.jit
    def step(lora, opt_state):
        loss = lambda lora: -jnp.sum(token_logprobs(nnx.merge(graphdef, lora, frozen), ids, mask))  # noqa: E731
        grads = jax.grad(loss)(lora)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    lora1, opt_state = step(lora, opt_state)
    lora2, _ = step(lora1, opt_state)
    a0, b0 = (np.asarray(lora["layers"][f"q_lora_{s}"][...]) for s in "ab")
    a1, b1 = (np.asarray(lora1["layers"][f"q_lora_{s}"][...]) for s in "ab")
    a2 = np.asarray(lora2["layers"]["q_lora_a"][...])
    assert not np.array_equal(b1, b0)
    # dL/dA = s G B^T is 0 while B = 0 (decoupled weight decay still shrinks A by lr * wd); A learns from step 2.
    np.testing.assert_allclose(a1, a0 * (1 - 1e-2 * 0.1), rtol=1e-6)
    assert np.abs(a2 - a1 * (1 - 1e-2 * 0.1)).max() > 1e-5
    # The frozen half is exactly the base policy's state: a KL reference with no copy of the weights.
    reference = nnx.merge(plain_graphdef(model), frozen)
    np.testing.assert_array_equal(np.asarray(_logprobs(reference, ids, mask)), np.asarray(_logprobs(model, ids, mask)))
    after = nnx.merge(graphdef, lora2, frozen)
    flat_after = dict(nnx.to_flat_state(nnx.state(after)))
    assert sum(not is_adapter for is_adapter, _ in before.values()) == len(before) - 14
    for path, (is_adapter, value) in before.items():
        if not is_adapter:
            np.testing.assert_array_equal(np.asarray(flat_after[path][...]), value)  # base bitwise unchanged


# ------------------------------------------------------------------------------------------ sampling
def _engine(policy):
    eng = JaxEngine(policy, eos_token_ids=[2], pad_id=0, prompt_bucket=8, cache_dtype=jnp.float32)
    eng.decode_chunk, eng.decode_min_rows, eng.decode_compiler_options = 4, 2, FAST
    return eng


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_merged_and_applied_adapters_sample_the_same_tokens(temperature):
    model = _lora_policy("tiny-qwen2", perturb=False)
    _perturb_b(model, std=0.3)  # large enough to change the base model's samples
    prompts = [[5, 9, 17, 33], [7, 8], [100, 200, 300, 4, 5, 6, 7, 8, 9]]
    params = SamplingParams(n=2, max_new_tokens=10, temperature=temperature, seed=11)
    applied = _engine(model).generate(prompts, params)
    merged = _engine(merged_policy(model)).generate(prompts, params)
    base = _engine(init_policy(get_model_config("tiny-qwen2"), seed=1, dtype=jnp.float32)).generate(prompts, params)
    np.testing.assert_array_equal(applied.completion_ids_RxC, merged.completion_ids_RxC)
    np.testing.assert_array_equal(applied.completion_lens_R, merged.completion_lens_R)
    np.testing.assert_allclose(applied.logprobs_RxC, merged.logprobs_RxC, atol=2e-5)
    assert not np.array_equal(applied.completion_ids_RxC, base.completion_ids_RxC)  # the adapters mattered


# ------------------------------------------------------------------------------------------ sharding
def test_adapters_shard_like_their_base_weights():
    mesh = make_mesh((2, 2, 2))
    model = init_policy(get_model_config("tiny-qwen2"), seed=1, dtype=jnp.float32, mesh=mesh)
    attach_lora(model, LoRAConfig(rank=4, alpha=8.0), seed=2)
    _perturb_b(model)

    def spec(name):
        return tuple(getattr(model.layers, name)[...].sharding.spec)

    # q [L, D, H, Dh]: D over fsdp, H over tensor; A [L, D, R] keeps fsdp, B [L, R, H, Dh] keeps tensor.
    assert spec("q")[:3] == (None, "fsdp", "tensor")
    assert spec("q_lora_a")[:2] == (None, "fsdp") and all(a is None for a in spec("q_lora_a")[2:])
    assert spec("q_lora_b")[:3] == (None, None, "tensor")
    # o [L, H, Dh, D] and down [L, F, D]: the input side is the tensor-parallel one.
    assert spec("o_lora_a")[:2] == (None, "tensor") and spec("o_lora_b")[:3] == (None, None, "fsdp")
    assert spec("down_lora_a")[:2] == (None, "tensor") and spec("down_lora_b")[:3] == (None, None, "fsdp")
    # The trainer's state_shardings derives the same from the metadata; merging under jit keeps W's.
    abstract = state_shardings(nnx.state(model), mesh)
    assert tuple(abstract["layers"]["q_lora_b"].get_value().spec) == spec("q_lora_b")
    merged = jax.jit(lambda s: merge_lora(s, mesh))(nnx.state(model))
    base_sharding = model.layers.q[...].sharding
    assert merged["layers"]["q"][...].sharding.is_equivalent_to(base_sharding, model.layers.q[...].ndim)


# ------------------------------------------------------------------------------------------ PEFT export
@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch is not installed: PEFT parity needs it")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    path = str(tmp_path_factory.mktemp("llama") / "base")
    hf.save_pretrained(path)
    return path


def _hf_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.asarray(ids), dtype=torch.int64),
            attention_mask=torch.tensor(np.asarray(mask), dtype=torch.int64),
            position_ids=torch.tensor(np.asarray(mask_positions(mask)), dtype=torch.int64),
        )
    return out.logits.numpy()


def test_peft_export_matches_peft_and_the_merged_export_matches_transformers(hf_llama, tmp_path):
    try:
        import peft
    except ImportError as e:  # the test extra pins peft; without it the PEFT half cannot be checked
        pytest.skip(f"peft is not importable ({e}): pip install peft==0.21.2")
    import transformers

    from conspo_jax.models import load_hf_policy, save_hf_policy
    from conspo_jax.models.peft_io import load_peft_adapter, peft_keys, read_peft_config, save_peft_adapter

    model = load_hf_policy(hf_llama, dtype=jnp.float32)
    attach_lora(model, LoRAConfig(rank=4, alpha=8.0), seed=2)
    _perturb_b(model, std=0.1)
    ids, mask = _batch(b=2)
    ours = np.asarray(jax.jit(lambda m: policy_logits(m, hidden_states(m, ids, mask_positions(mask), mask)))(model))

    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=hf_llama)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    assert sorted(cfg["target_modules"]) == sorted(f"{t}_proj" for t in LORA_TARGETS)
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2
    a_key, b_key = peft_keys(model.config, "q", 0)
    assert a_key == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[a_key].shape == (4, 64) and tensors[b_key].shape == (4 * 16, 4)  # [r, in], [out, r]
    a_key, b_key = peft_keys(model.config, "down", 1)
    assert a_key == "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    assert tensors[a_key].shape == (4, 128) and tensors[b_key].shape == (64, 4)

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, attn_implementation="eager").eval()
    plain = _hf_logits(base, ids, mask)
    with_adapter = peft.PeftModel.from_pretrained(base, out).eval()
    theirs = _hf_logits(with_adapter, ids, mask)
    real = np.asarray(mask)
    assert np.abs(ours - plain)[real].max() > 0.1  # the adapter changes the logits
    np.testing.assert_allclose(ours[real], theirs[real], atol=2e-5, rtol=0)  # fp32 both sides

    merged_dir = save_hf_policy(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
    np.testing.assert_allclose(_hf_logits(merged, ids, mask)[real], ours[real], atol=2e-5, rtol=0)

    # Reading the directory back gives the adapters bit for bit.
    again = load_hf_policy(hf_llama, dtype=jnp.float32)
    attach_lora(again, read_peft_config(out, again.config))
    load_peft_adapter(again, out)
    for (p, x), (q, y) in zip(
        nnx.to_flat_state(nnx.state(model, LoRAParam)), nnx.to_flat_state(nnx.state(again, LoRAParam))
    ):
        assert p == q
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]))


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=-1), "model.lora.rank must be an integer >= 0 (0 = off), got -1"),
        (dict(rank=2.5), "model.lora.rank must be an integer >= 0 (0 = off), got 2.5"),
        (dict(alpha=0.0), "model.lora.alpha must be a finite number > 0, got 0.0"),
        (dict(alpha=float("nan")), "model.lora.alpha must be a finite number > 0, got nan"),
        (dict(targets="q,qkv"), "model.lora.targets has unknown target 'qkv'"),
        (dict(targets=("q", "lm_head")), "model.lora.targets has unknown target 'lm_head'"),
        (dict(targets=""), "model.lora.targets is empty"),
    ],
)
def test_bad_lora_settings_name_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError) as e:
        LoRAConfig(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lora_config_forms():
    assert LoRAConfig(targets="up, q,q").targets == ("q", "up")  # canonical order, duplicates merged
    assert LoRAConfig(rank=8, alpha=16).scale == 2.0
    assert LoRAConfig.from_config({"rank": 0, "alpha": 16.0, "targets": "q,k,v,o,gate,up,down"}) == LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="model.lora.dropout is not a LoRA option"):
        LoRAConfig.from_config({"rank": 8, "dropout": 0.1})
    model = init_policy(get_model_config("tiny-qwen2"), seed=1, dtype=jnp.float32)
    assert attach_lora(model, LoRAConfig(rank=0)).lora is None  # rank 0: nothing attached
    attach_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        attach_lora(model, LoRAConfig(rank=2))


def test_run_config_lora_section_is_validated():
    from conspo_jax.run.validation import _check_lora
    from conspo_jax.train.config_base import base_config

    c = base_config()
    assert (c.model.lora.rank, c.model.lora.alpha) == (0, 16.0)
    _check_lora(c.model.lora)  # the default (off) is valid
    c.model.lora.rank = -1
    with pytest.raises(UsageError, match=r"model.lora.rank must be an integer >= 0 \(0 = off\), got -1"):
        _check_lora(c.model.lora)
    c.model.lora.rank, c.model.lora.targets = 0, "q,x"
    with pytest.raises(UsageError, match="model.lora.targets has unknown target 'x'"):
        _check_lora(c.model.lora)
    c.model.lora.rank, c.model.lora.targets = 8, "q,v"
    assert _check_lora(c.model.lora) == LoRAConfig(rank=8, targets=("q", "v"))


# ------------------------------------------------------------------------------------------ accounting
def test_adapter_count_for_smollm2_135m_shapes():
    c = get_model_config("smollm2-135m")
    lora = LoRAConfig(rank=8, alpha=16.0)
    d, f, q, kv = 576, 1536, 9 * 64, 3 * 64
    per_layer = 8 * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    assert count_lora_params(c, lora) == 30 * per_layer == 2_442_240
    assert c.num_params() == 134_515_008
    assert 0.018 < count_lora_params(c, lora) / c.num_params() < 0.0182  # 1.82% of SmolLM2-135M
    # The bytes a LoRA run ships per weight sync: the adapters alone, from shapes (no weights needed).
    abstract = nnx.eval_shape(lambda: attach_lora(init_policy(c, dtype=jnp.float32), lora))
    assert state_nbytes(adapter_state(nnx.state(abstract))) == 4 * 2_442_240
