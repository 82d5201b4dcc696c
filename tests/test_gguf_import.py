"""`import_gguf` / `conspo import-gguf` on tiny Llama GGUF files written here the way llama.cpp's converter
writes them (rotary-permuted Q/K rows, F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, a BPE tokenizer in the
metadata), checked against the dequantised source weights, transformers' own GGUF reader and
transformers' Llama; plus log-prob parity on the real SmolLM2-135M-Instruct when it is cached.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
torch = pytest.importorskip("torch", reason="torch is not installed: HF parity tests need it")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from gguf.quants import dequantize, quantize  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from conspo_jax.cli import main as cli_main  # noqa: E402
from conspo_jax.models import load_hf_policy, token_logprobs  # noqa: E402
from conspo_jax.models.gguf_import import GGUFImportError, import_gguf  # noqa: E402
from conspo_jax.models.smollm2 import smollm2_path_or_none  # noqa: E402

Q = gguf.GGMLQuantizationType
V, D, F, H, K, L = 320, 64, 128, 4, 2, 2
E = D // H
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ["hello world, the quick brown fox jumps over the lazy dog 0123456789"] * 4 + ["<think>ok</think>"]
TEXTS = ["hello world", "The  quick\nbrown fox; 42 dogs!", "ünïcödé ☃ hello<|im_end|>x", "  leading <think> spaces "]
# One of each supported type, placed on different layers/roles so a wrong type or layout cannot hide.
TYPES = {
    "token_embd.weight": Q.Q8_0,
    "blk.0.attn_q.weight": Q.F32,
    "blk.0.attn_k.weight": Q.F16,
    "blk.0.attn_v.weight": Q.Q4_0,
    "blk.0.attn_output.weight": Q.Q4_1,
    "blk.0.ffn_gate.weight": Q.Q8_0,
    "blk.0.ffn_up.weight": Q.BF16,
    "blk.0.ffn_down.weight": Q.Q4_1,
    "blk.1.attn_q.weight": Q.Q4_1,
    "blk.1.attn_k.weight": Q.Q8_0,
    "blk.1.attn_v.weight": Q.F16,
    "blk.1.attn_output.weight": Q.F32,
    "blk.1.ffn_gate.weight": Q.Q4_0,
    "blk.1.ffn_up.weight": Q.F16,
    "blk.1.ffn_down.weight": Q.Q8_0,
}
HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows [2, E/2] -> [E/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bpe_tokens():
    """A byte-level BPE vocabulary of V tokens: specials, then what a trainer learns from CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=V - 1, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    state = json.loads(tok.to_str())["model"]
    tokens = sorted(state["vocab"], key=state["vocab"].get) + ["<think>"]
    tokens += [f"[UNUSED{i}]" for i in range(V - len(tokens))]
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    types = [3 if t in SPECIALS else 4 if t == "<think>" else 5 if t.startswith("[UNUSED") else 1 for t in tokens]
    return tokens, types, merges


def _sp_tokens():
    """A sentencepiece-style vocabulary (llama.cpp's "llama" model): bytes, pieces with scores, no merges."""
    pieces = ["\u2581", *"abcdefghijklmnopqrstuvwxyz", "he", "ll", "llo", "hello", "\u2581hello", "\u2581w", "or"]
    pieces += ["ld", "\u2581world", "\u2581t", "\u2581the", "ck", "\u2581qu", "\u2581quick", "\u2581br", "own"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    tokens += [f"[UNUSED{i}]" for i in range(V - len(tokens))]
    types += [5] * (V - len(types))
    scores += [-1000.0] * (V - len(scores))
    return tokens, types, scores


def _hf_weights(tied=True, seed=0):
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, D)), "model.norm.weight": 1 + 0.1 * rng.normal(size=D)}
    if not tied:
        w["lm_head.weight"] = rng.normal(0, 0.5, (V, D))
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
        for name, shape in [("q", (H * E, D)), ("k", (K * E, D)), ("v", (K * E, D)), ("o", (D, H * E))]:
            w[p + f"self_attn.{name}_proj.weight"] = rng.normal(0, 0.2, shape)
        for name, shape in [("gate", (F, D)), ("up", (F, D)), ("down", (D, F))]:
            w[p + f"mlp.{name}_proj.weight"] = rng.normal(0, 0.2, shape)
    return {k: v.astype(np.float32) for k, v in w.items()}


def _write_gguf(path, weights, *, arch="llama", tokenizer="gpt2", types=TYPES):
    """Writes `weights` (HF names and layout) as llama.cpp's converter would; returns what the importer
    should recover for each HF name: the dequantised (quantisation-rounded) source tensor."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_dimension_count(E)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if tokenizer == "gpt2":
        tokens, token_types, merges = _bpe_tokens()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
    else:
        tokens, token_types, scores = _sp_tokens()
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_chat_template(TEMPLATE)
    expected = {}
    gguf_names = {v: k for k, v in HF_NAMES.items()}
    for hf_name, t in weights.items():
        parts = hf_name.split(".")
        if hf_name.startswith("model.layers."):
            name = f"blk.{parts[2]}.{gguf_names['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            name = f"{gguf_names['.'.join(parts[:-1])]}.{parts[-1]}"
        if ".attn_q." in name:
            t = _llama_cpp_permute(t, H)
        elif ".attn_k." in name:
            t = _llama_cpp_permute(t, K)
        qtype = types.get(name, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, t)
        elif qtype == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        elif qtype == Q.IQ4_NL:  # no numpy quantiser: zero bytes are a valid tensor of this type
            w.add_tensor(name, np.zeros(gguf.quant_shape_to_byte_shape(t.shape, qtype), np.uint8), raw_dtype=qtype)
            continue
        else:
            w.add_tensor(name, quantize(t, qtype), raw_dtype=qtype)
        # Blocks run along rows, so quantising commutes with the row permutation.
        expected[hf_name] = dequantize(quantize(weights[hf_name], qtype), qtype).reshape(t.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, imported dir, expected tensors); the import goes through the CLI."""
    root = tmp_path_factory.mktemp("gguf")
    expected = _write_gguf(root / "tiny.gguf", _hf_weights())
    assert cli_main(["conspo", "import-gguf", str(root / "tiny.gguf"), str(root / "hf")]) == 0
    return root / "tiny.gguf", root / "hf", expected


def _read_safetensors(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _hf_logp(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits.double()
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0].numpy()


def _our_logp(path, ids):
    model = load_hf_policy(path, dtype=jnp.float32)
    return np.asarray(jax.jit(token_logprobs)(model, jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, bool)))


def test_tensors_are_the_dequantised_unpermuted_sources(tiny):
    _, out, expected = tiny
    got = _read_safetensors(out)
    assert set(got) == set(expected) and "lm_head.weight" not in got  # tied: no head tensor
    for name, want in expected.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (H, K, E, V)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_logits_match_transformers_gguf_reader(tiny):
    """Transformers' GGUF reader (config + dequantised tensors) gives the same weights; our forward pass on
    the imported directory gives its log-probs."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, out, _ = tiny
    cfg = load_gguf_checkpoint(str(path))["config"]
    ours = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
        assert ours[key] == cfg[key], key
    # from_pretrained(gguf_file=...) insists on accelerate; building the model and filling it is the same.
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}, attn_implementation="eager")
    )
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    assert set(tensors) == set(_read_safetensors(out))
    for name, t in _read_safetensors(out).items():
        np.testing.assert_array_equal(tensors[name].numpy(), t, err_msg=name)
    hf.load_state_dict(tensors, strict=False)
    hf.tie_weights()
    ids = np.random.default_rng(1).integers(0, V, (2, 12))
    want = _hf_logp(hf.eval(), ids)
    got = _our_logp(out, ids)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want).max() > 1  # a non-trivial comparison


def test_tokenizer_loads_and_renders_the_chat_template(tiny):
    path, out, _ = tiny
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == text
    think = _bpe_tokens()[0].index("<think>")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2 and tok("a<think>")["input_ids"][-1:] == [think]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "hello world"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids[0] == 1 and ids.count(2) == 1 and tok.decode(ids) == text


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    _write_gguf(tmp_path / "sp.gguf", _hf_weights(tied=False), tokenizer="llama", types={})
    out = import_gguf(tmp_path / "sp.gguf", tmp_path / "hf", progress=False)
    assert "lm_head.weight" in _read_safetensors(out)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for text in ["hello world", "the quick brown fox", "Hello wörld\n tab\t!", "two  spaces", "  lead"]:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], (text, tok.convert_ids_to_tokens(ids))
        assert ids[0] == 1
        if not text.startswith(" "):  # a leading space is dropped on decode, as by HF's Llama tokenizer
            assert tok.decode(ids, skip_special_tokens=True) == text


def test_unsupported_type_and_architecture_name_the_tensor_and_field(tmp_path, capsys):
    _write_gguf(tmp_path / "iq4.gguf", _hf_weights(), types={**TYPES, "blk.1.ffn_up.weight": Q.IQ4_NL})
    with pytest.raises(GGUFImportError, match=r"'blk\.1\.ffn_up\.weight' has type IQ4_NL"):
        import_gguf(tmp_path / "iq4.gguf", tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["iq4.gguf"]  # nothing half-written

    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cli_main(["conspo", "import-gguf", str(tmp_path / "qwen.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "general.architecture='qwen2'" in err and len(err.splitlines()) == 1, err
    for args, needle in [
        ([str(tmp_path / "missing.gguf"), str(tmp_path / "out")], "no such GGUF file"),
        ([str(tmp_path / "iq4.gguf")], "takes two arguments"),
        ([str(tmp_path / "iq4.gguf"), str(tmp_path / "o"), "--dtype=int8"], "dtype"),
        ([str(tmp_path / "qwen.gguf"), str(tmp_path / "o"), "--bogus"], "bogus"),
    ]:
        assert cli_main(["conspo", "import-gguf", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_overwrite_is_refused_unless_asked_and_bf16_storage(tiny, capsys, tmp_path):
    path, out, expected = tiny
    assert cli_main(["conspo", "import-gguf", str(path), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    dst = tmp_path / "bf16"
    dst.mkdir()  # an empty directory is fine to fill
    assert cli_main(["conspo", "import-gguf", str(path), str(dst), "--dtype=bfloat16"]) == 0
    from conspo_jax.models.safetensors_io import CheckpointReader

    r = CheckpointReader(str(dst))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert r.dtype(name) == ml_dtypes.bfloat16
    np.testing.assert_allclose(np.asarray(r.tensor(name), np.float32), expected[name], rtol=1e-2, atol=1e-2)
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert cli_main(["conspo", "import-gguf", str(path), str(dst), "--overwrite"]) == 0
    # Small shards: several files and an index, which the loader reads as one checkpoint.
    sharded = import_gguf(path, tmp_path / "sharded", max_shard_bytes=100_000, progress=False)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    r = CheckpointReader(sharded)
    for name, want in expected.items():
        np.testing.assert_array_equal(np.asarray(r.tensor(name)), want, err_msg=name)
    assert sorted(os.listdir(tmp_path)) == ["bf16", "sharded"]  # no temporary directories left behind


def test_smollm2_logprob_parity():
    path = smollm2_path_or_none()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct is not cached: `make smollm2` downloads and imports it (~100 MB)")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    messages = [
        {"role": "user", "content": "What is 12 + 345? Answer briefly."},
        {"role": "assistant", "content": "12 + 345 = 357."},
    ]
    ids = tok.apply_chat_template(messages, tokenize=True)
    ids = np.asarray([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    want = _hf_logp(hf.eval(), ids)
    got = _our_logp(path, ids)
    assert np.abs(got - want).max() < 1e-3
    assert -6 < want.mean() < -0.5  # a trained model: far better than uniform (-10.8) on its own chat format
