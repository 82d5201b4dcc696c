"""conspo_jax.profiling on tiny CPU programs: compile analyses, HLO facts, traces, FLOP formulas, table."""

import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from conspo_jax import profiling as P
from conspo_jax.models import get_model_config
from conspo_jax.profiling import analyses


def _scanned_mlp(x_NxD, w_LxDxD):
    def body(x, w):
        return jnp.tanh(x @ w), None

    return jax.lax.scan(body, x_NxD, w_LxDxD)[0].sum()


def test_compile_report_writes_hlo_and_sane_numbers(tmp_path):
    n, d, layers = 32, 48, 4
    fn = jax.jit(jax.grad(_scanned_mlp, argnums=1))
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((layers, d, d), jnp.float32)
    report = P.compile_report(fn, x, w, name="mlp", out_dir=tmp_path)

    assert report["stablehlo_path"] == os.path.join(tmp_path, "mlp.stablehlo.txt")
    stablehlo = open(report["stablehlo_path"]).read()
    hlo = open(report["hlo_path"]).read()
    assert "stablehlo.dot_general" in stablehlo and "func.func" in stablehlo
    assert "ENTRY" in hlo and " dot(" in hlo
    assert report["compile_s"] > 0 and report["lower_s"] > 0
    # Arguments are exactly x and w in f32; the output is dL/dw.
    assert report["argument_bytes"] == 4 * (n * d + layers * d * d)
    assert report["output_bytes"] == 4 * layers * d * d
    assert report["peak_bytes"] == (
        report["argument_bytes"] + report["output_bytes"] + report["temp_bytes"] - report["alias_bytes"]
    )
    assert report["flops"] > 2 * n * d * d  # at least one layer's matmul
    json.dumps(report)  # JSON-ready

    kept = P.compile_report(fn, x, w, name="mlp2", out_dir=tmp_path, keep_compiled=True)
    out = kept["compiled"](jnp.ones((n, d)), jnp.ones((layers, d, d)) * 0.01)
    assert out.shape == (layers, d, d)
    P.save_json(kept, tmp_path / "kept.json")
    assert "compiled" not in json.load(open(tmp_path / "kept.json"))


def test_compile_report_rejects_unjitted():
    with pytest.raises(TypeError, match="jitted_fn"):
        P.compile_report(lambda x: x, jnp.ones(2), name="x", out_dir="/tmp")


def test_hlo_facts_counts_loop_flops_and_f32_dots(tmp_path):
    n, d, layers = 32, 48, 5
    fn = jax.jit(jax.grad(_scanned_mlp, argnums=1))
    report = P.compile_report(fn, jnp.ones((n, d)), jnp.ones((layers, d, d)), name="mlp", out_dir=tmp_path)
    facts = P.hlo_facts(open(report["hlo_path"]).read(), vocab_size=1000)
    # Forward x @ w, backward dx and dw: three [n,d]x[d,d] matmuls per layer, each run `layers` times.
    assert facts["dot_flops"] == 3 * layers * 2 * n * d * d
    assert facts["dot_flops_loops_once"] == 3 * 2 * n * d * d  # each loop body once, as XLA counts
    assert facts["unknown_trip_counts"] == 0
    assert facts["num_f32_dots"] == facts["num_dots"] >= 3
    assert facts["num_f32_vocab_dots"] == 0 and not facts["cudnn_attention"]
    # XLA's own cost analysis counts a loop body once: the reason the summary uses dot_flops.
    assert report["flops"] < facts["dot_flops"] / 2


def _head_loss(h_TxD, w_DxV):
    logits = jnp.einsum("td,dv->tv", h_TxD.astype(jnp.bfloat16), w_DxV, preferred_element_type=jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1).sum()


@pytest.mark.parametrize("which", ["hlo", "stablehlo"])
def test_hlo_facts_finds_the_f32_tokens_by_vocab_dot(tmp_path, which):
    t, d, v = 24, 16, 200
    h, w = jnp.ones((t, d)), jnp.ones((d, v), jnp.bfloat16)
    fwd = P.compile_report(jax.jit(_head_loss), h, w, name="fwd", out_dir=tmp_path)
    fwd_facts = P.hlo_facts(open(fwd[f"{which}_path"]).read(), vocab_size=v)
    # bf16 x bf16 -> f32 accumulation is not an f32 dot.
    assert fwd_facts["num_dots"] == 1 and fwd_facts["num_f32_dots"] == 0 and fwd_facts["num_f32_vocab_dots"] == 0

    bwd = P.compile_report(jax.jit(jax.grad(_head_loss, argnums=(0, 1))), h, w, name="bwd", out_dir=tmp_path)
    facts = P.hlo_facts(open(bwd[f"{which}_path"]).read(), vocab_size=v)
    # JAX's transpose of the mixed-precision dot runs both backward matmuls on the f32 [T, V] cotangent.
    assert facts["num_f32_vocab_dots"] == 2
    assert all(f"[{t},{v}]" in s or f"[{v},{t}]" in s for s in facts["f32_vocab_dot_shapes"])
    assert P.hlo_facts(open(bwd[f"{which}_path"]).read(), vocab_size=v + 1)["num_f32_vocab_dots"] == 0


def test_hlo_facts_counts_kv_cache_copies():
    cache = (2, 3, 8, 2, 4)
    two = jax.jit(lambda c: (c, c)).lower(jnp.ones(cache)).compile().as_text()
    assert P.hlo_facts(two, kv_cache_shapes=[cache])["kv_cache_copies"] == 2
    assert P.hlo_facts(two, kv_cache_shapes=[(2, 3, 8, 2, 5)])["kv_cache_copies"] == 0
    # Swapping two cache-shaped carries in a loop copies them every iteration: counted x trip count.
    swap = jax.jit(lambda c: jax.lax.fori_loop(0, 3, lambda i, a: (a[1], a[0]), (c, 2 * c)))
    per_loop = P.hlo_facts(swap.lower(jnp.ones(cache)).compile().as_text(), kv_cache_shapes=[cache])
    assert per_loop["kv_cache_copies"] >= 6


# A GPU module as XLA:GPU prints it (hand-written: no GPU here): matmuls are cuBLAS custom calls and
# flash attention a cuDNN one, with their dimension numbers in backend_config.
_GPU_HLO = """HloModule m

ENTRY %main (a: bf16[16,64], b: bf16[64,32], q: bf16[2,128,4,16], k: bf16[2,128,4,16]) -> bf16[16,32] {
  %a = bf16[16,64]{1,0} parameter(0)
  %b = bf16[64,32]{1,0} parameter(1)
  %q = bf16[2,128,4,16]{3,2,1,0} parameter(2)
  %k = bf16[2,128,4,16]{3,2,1,0} parameter(3)
  %gemm = (bf16[16,32]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", \
backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],\
"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %fmha = (bf16[2,128,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %k), custom_call_target="__cudnn$fmhaSoftmax", \
backend_config={"cudnn_fmha_backend_config":{"bmm1_dot_dimension_numbers":{"lhs_contracting_dimensions":["3"],\
"rhs_contracting_dimensions":["3"],"lhs_batch_dimensions":["0","2"],"rhs_batch_dimensions":["0","2"]},\
"mask_type":"CAUSAL"}}
  ROOT %out = bf16[16,32]{1,0} get-tuple-element(%gemm), index=0
}
"""


def test_hlo_facts_reads_cublas_and_cudnn_calls():
    facts = P.hlo_facts(_GPU_HLO)
    assert facts["cudnn_attention"] and "__cudnn$fmhaSoftmax" in facts["custom_call_targets"]
    assert facts["num_dots"] == 1 and facts["num_f32_dots"] == 0
    assert facts["dot_flops"] == 2 * 16 * 32 * 64
    q_elems, keys = 2 * 128 * 4 * 16, 128
    # Forward: QK^T and PV, 2 * |q| * S each, halved by the causal mask.
    assert facts["fused_attention_flops"] == 2 * 2 * q_elems * keys * 0.5
    assert facts["executed_flops"] == facts["dot_flops"] + facts["fused_attention_flops"]
    bwd = P.hlo_facts(_GPU_HLO.replace("fmhaSoftmax", "fmhaSoftmaxBackward").replace('"CAUSAL"', '"NO_MASK"'))
    assert bwd["fused_attention_flops"] == 5 * 2 * q_elems * keys
    plain = P.hlo_facts(_GPU_HLO.replace("cudnn$fmha", "cublas$gemm"))
    assert not plain["cudnn_attention"] and plain["fused_attention_flops"] == 0


def test_trace_steps_writes_xplane_perfetto_and_memory_profile(tmp_path):
    step = jax.jit(lambda a, s: jnp.tanh(a @ a) * s)
    a = jnp.ones((64, 64))
    seconds = P.trace_steps(step, 3, tmp_path, make_args=lambda i: (a, jnp.float32(i)))
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    files = P.trace_files(tmp_path)
    assert files["xplane"].endswith(".xplane.pb") and os.path.getsize(files["xplane"]) > 0
    assert os.sep + os.path.join("plugins", "profile") + os.sep in files["xplane"]
    assert os.path.getsize(files["memory_profile"]) > 0
    events = P.read_perfetto_events(files["perfetto"])
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and e.get("ph") == "X")
    assert steps == [0, 1, 2]
    with pytest.raises(ValueError, match="n=0"):
        P.trace_steps(step, 0, tmp_path, make_args=lambda i: (a, 1.0))


def test_model_flops_per_token_by_hand():
    c = get_model_config("tiny-qwen2")  # d=64, f=128, 2 layers, 4 heads x 16, 2 kv heads, qkv bias, V=384
    d, f, v, layers = 64, 128, 384, 2
    attn = d * 4 * 16 + 2 * d * 2 * 16 + 4 * 16 * d + (4 + 2 * 2) * 16
    per_layer = attn + 3 * d * f + 2 * d  # projections + biases, SwiGLU, two norms
    params = layers * per_layer + d + d * v  # + final norm + LM head (tied or not), no input embedding
    assert P.model_flops_per_token(c, 100) == 6 * params + 6 * layers * d * 100
    tied = get_model_config("tiny-qwen2", tie_word_embeddings=True)
    assert P.model_flops_per_token(tied, 100) == P.model_flops_per_token(c, 100)


def test_measure_matmul_peak_and_summary_table():
    peak = P.measure_matmul_peak(jnp.float32, 128, repeats=2, rounds=2)
    assert math.isfinite(peak) and peak > 1e6
    report = dict(flops=1e9, compile_s=1.5, peak_bytes=3 * 2**30)
    facts = dict(executed_flops=4.4e9, cudnn_attention=False, num_f32_dots=2, num_f32_vocab_dots=0, kv_cache_copies=0)
    row = P.summary_row(
        "train",
        report=report,
        tokens_per_step=1000,
        model_flops_per_token=4e6,
        step_seconds=[0.3, 0.1, 0.2],
        facts=facts,
        program_facts=dict(num_f32_dots=1, num_f32_vocab_dots=0),
        peak_flops=1e12,
        peak_flops_how="given",
    )
    assert row["step_s"] == 0.2 and row["tokens_per_s"] == 5000
    assert row["executed_over_model"] == pytest.approx(1.1)
    assert row["mfu"] == pytest.approx(5000 * 4e6 / 1e12)
    table = P.summary_table([row])
    line = table.splitlines()[2]
    assert line.startswith("train") and "5,000" in line and "1.100" in line and "3.00" in line and "2.0%" in line
    assert " 2/1 " in line and " 0/0 " in line  # f32 dots: compiled HLO / StableHLO
    assert "1.00 TFLOP/s (given)" in table


def test_cost_and_memory_analyses_of_any_jax_version():
    # cost_analysis(): a dict (jax >= 0.4.30), a list of per-program dicts (older), or None.
    assert analyses._cost_dict({"flops": 3.0, "bytes accessed": 8, "note": "x"}) == {
        "flops": 3.0,
        "bytes accessed": 8.0,
    }
    assert analyses._cost_dict([{"flops": 3.0}, {"flops": 4.0, "bytes accessed": 1.0}]) == {
        "flops": 7.0,
        "bytes accessed": 1.0,
    }
    assert analyses._cost_dict(None) == {}
    none = analyses._memory_dict(None)
    assert none["peak_bytes"] is None and none["temp_bytes"] is None
