"""SGLangEngine against a STAND-IN for ``sglang.Engine`` (SGLang itself cannot be installed on this
CPU-only machine; it ships CUDA-only wheels).

The stand-in has the method signatures of sgl-project/sglang ``python/sglang/srt/entrypoints/engine.py``
(0.5.x) and returns outputs in its documented shapes; it is not SGLang. These tests check that our
wrapper calls that API the way the real engine expects (one request per sample, distinct
``sampling_seed``s, ``return_logprob``, ``top_p``, update-then-flush) and parses its outputs into
``Rollouts``. The real engine is exercised by ``scripts/sglang_e2e.sh`` on a GPU machine; when sglang
is importable here, the signature test below also compares against the real class.
"""

import inspect

import numpy as np
import pytest

from conspo_jax.rollout.engine import SamplingParams
from conspo_jax.rollout.sglang_engine import SGLangEngine, sample_seed
from conspo_jax.sidecar.engines import EngineHandle


class StandInSGLangEngine:
    """Mimics sglang.Engine's offline API: generate / update_weights_from_disk / flush_cache / shutdown."""

    def __init__(self, eos=1, finish="stop", update_ok=True):
        self.calls, self.eos, self.finish, self.update_ok = [], eos, finish, update_ok

    def generate(
        self,
        prompt=None,
        sampling_params=None,
        input_ids=None,
        image_data=None,
        audio_data=None,
        video_data=None,
        mm_hashes=None,
        mm_content_hashes=None,
        return_logprob=False,
        logprob_start_len=None,
        top_logprobs_num=None,
        token_ids_logprob=None,
        lora_path=None,
        custom_logit_processor=None,
        require_reasoning=False,
        return_hidden_states=False,
        return_routed_experts=False,
        routed_experts_start_len=0,
        stream=False,
        bootstrap_host=None,
        bootstrap_port=None,
        bootstrap_room=None,
        routed_dp_rank=None,
        disagg_prefill_dp_rank=None,
        data_parallel_rank=None,
        external_trace_header=None,
        rid=None,
        session_params=None,
        priority=None,
        session_id=None,
        *,
        cache_salt=None,
    ):
        self.calls.append(
            (
                "generate",
                dict(
                    input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob, prompt=prompt
                ),
            )
        )
        outs = []
        for ids, sp in zip(input_ids, sampling_params):
            # Deterministic "sampling" from the seed: length 1..max_new_tokens, last token EOS when stopping.
            rng = np.random.default_rng(sp["sampling_seed"] % 2**32)
            toks = rng.integers(2, 30, size=sp["max_new_tokens"]).tolist()
            if self.finish == "stop":
                toks = toks[: max(1, len(toks) - 1)] + [self.eos]
            lps = (-rng.random(len(toks))).tolist()
            meta = {
                "output_token_logprobs": [(lp, t, None) for lp, t in zip(lps, toks)],
                "finish_reason": {"type": self.finish, "matched": self.eos}
                if self.finish == "stop"
                else {"type": self.finish, "length": len(toks)},
                "prompt_tokens": len(ids),
                "completion_tokens": len(toks),
            }
            outs.append({"text": "", "output_ids": toks, "meta_info": meta})
        return outs[0] if len(outs) == 1 else outs

    def update_weights_from_disk(self, model_path, load_format=None):
        self.calls.append(("update_weights_from_disk", model_path))
        return (self.update_ok, "ok" if self.update_ok else "bad checkpoint", 0)

    def flush_cache(self):
        self.calls.append(("flush_cache",))

    def shutdown(self):
        self.calls.append(("shutdown",))


def test_one_request_per_sample_with_distinct_seeds_and_logprobs():
    fake = StandInSGLangEngine()
    engine = SGLangEngine(engine=fake, version=3)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, top_k=0, max_new_tokens=5, stop_token_ids=(7,), seed=42)
    ro = engine.generate([[5, 6], [9]], params)
    ((name, call),) = fake.calls
    assert name == "generate" and call["return_logprob"] is True and call["prompt"] is None
    assert call["input_ids"] == [[5, 6]] * 3 + [[9]] * 3  # prompt-major, one request per sample
    sps = call["sampling_params"]
    assert len({sp["sampling_seed"] for sp in sps}) == 6
    assert [sp["sampling_seed"] for sp in sps] == [sample_seed(42, r) for r in range(6)]
    assert all(sp["top_p"] == pytest.approx(0.9) and sp["temperature"] == pytest.approx(0.8) for sp in sps)
    assert all(sp["top_k"] == -1 and sp["stop_token_ids"] == [7] and sp["max_new_tokens"] == 5 for sp in sps)
    assert all(0 <= sp["sampling_seed"] < 2**63 for sp in sps)
    # Parsed output: ids and log-probs from output_token_logprobs, EOS included, prompt-major groups.
    assert ro.num_rows == 6 and ro.weight_version == 3 and ro.finish_reasons == ["stop"] * 6
    np.testing.assert_array_equal(ro.group_ids_R, [0, 0, 0, 1, 1, 1])
    again = StandInSGLangEngine().generate(input_ids=call["input_ids"], sampling_params=sps, return_logprob=True)
    for r, out in enumerate(again):
        entries = out["meta_info"]["output_token_logprobs"]
        assert ro.completions()[r] == [e[1] for e in entries] and ro.completions()[r][-1] == 1
        np.testing.assert_allclose(ro.logprobs_RxC[r, : len(entries)], [e[0] for e in entries], rtol=1e-6)
        assert (ro.logprobs_RxC[r, len(entries) :] == 0).all()


def test_length_finish_top_k_and_single_output():
    fake = StandInSGLangEngine(finish="length")
    ro = SGLangEngine(engine=fake).generate([[4]], SamplingParams(n=1, top_k=5, max_new_tokens=4))
    assert fake.calls[0][1]["sampling_params"][0]["top_k"] == 5
    assert ro.finish_reasons == ["length"] and ro.completion_lens_R.tolist() == [4]


def test_aborted_or_mismatched_outputs_raise():
    fake = StandInSGLangEngine(finish="abort")
    with pytest.raises(RuntimeError, match="finished with"):
        SGLangEngine(engine=fake).generate([[4]], SamplingParams(n=2, max_new_tokens=3))
    with pytest.raises(ValueError, match="at least one token"):
        SGLangEngine(engine=StandInSGLangEngine()).generate([[]], SamplingParams(n=1))


def test_weights_update_from_disk_then_flush_cache():
    fake = StandInSGLangEngine()
    engine = SGLangEngine(engine=fake)
    engine.sync("/dev/shm/w/v000002", 2)
    assert fake.calls == [("update_weights_from_disk", "/dev/shm/w/v000002"), ("flush_cache",)]
    assert engine.version == 2
    bad = StandInSGLangEngine(update_ok=False)
    engine = SGLangEngine(engine=bad)
    with pytest.raises(RuntimeError, match="bad checkpoint"):
        engine.sync("/x", 5)
    assert engine.version == 0 and ("flush_cache",) not in bad.calls
    engine.close()
    assert bad.calls[-1] == ("shutdown",)


def test_a_lora_adapter_push_is_refused_by_name(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    fake = StandInSGLangEngine()
    engine = SGLangEngine(engine=fake)
    with pytest.raises(ValueError, match="a PEFT adapter .* serve LoRA runs with --engine jax"):
        engine.sync(str(tmp_path), 1)
    assert fake.calls == [] and engine.version == 0


def test_served_through_the_sidecar(tmp_path):
    """The SGLang wrapper behind the real gRPC server, PushWeights included."""
    from conspo_jax.rollout.sidecar_client import SidecarClient
    from conspo_jax.sidecar.options import SidecarOptions
    from conspo_jax.sidecar.server import serve

    fake = StandInSGLangEngine()
    engine = SGLangEngine(engine=fake)
    (tmp_path / "v000001").mkdir()
    srv = serve(
        handle=EngineHandle("sglang", engine),
        options=SidecarOptions(weights_dir=str(tmp_path), workers=0),
    )
    try:
        with SidecarClient(srv.target) as client:
            client.push_weights("v000001", 1)
            ro = client.generate([[3, 4]], SamplingParams(n=2, max_new_tokens=4, seed=1))
        assert ro.weight_version == 1 and ro.num_rows == 2
        assert fake.calls[0] == ("update_weights_from_disk", str(tmp_path / "v000001"))
    finally:
        srv.stop(grace=0)


def test_stand_in_matches_the_real_signatures():
    sglang = pytest.importorskip(
        "sglang",
        reason="sglang is not installable here (CUDA-only); the stand-in "
        "signatures were copied from sglang 0.5.x engine.py",
    )
    real = sglang.Engine
    for name in ("generate", "update_weights_from_disk", "flush_cache"):
        real_params = set(inspect.signature(getattr(real, name)).parameters)
        ours = set(inspect.signature(getattr(StandInSGLangEngine, name)).parameters)
        used = {
            "generate": {"input_ids", "sampling_params", "return_logprob"},
            "update_weights_from_disk": {"model_path"},
            "flush_cache": set(),
        }[name]
        assert used <= real_params and used <= ours, (name, real_params)
