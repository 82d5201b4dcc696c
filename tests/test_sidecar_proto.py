"""The committed gRPC stubs match rollout.proto, and the wire codec round-trips engine values."""

import os

import numpy as np
import pytest

from conspo_jax.rollout.engine import FINISH_LENGTH, FINISH_STOP, MockEngine, Rollouts, SamplingParams
from conspo_jax.rollout.wire import codec, gen_proto
from conspo_jax.rollout.wire import rollout_pb2 as pb


def test_committed_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to regenerate the stubs")
    gen_proto.generate(str(tmp_path))
    for name in gen_proto.GENERATED:
        with open(os.path.join(gen_proto.PACKAGE_DIR, name)) as f:
            committed = f.read()
        with open(tmp_path / name) as f:
            fresh = f.read()
        if name == "rollout_pb2.py":
            # The protocol itself: must match whatever grpcio-tools is installed.
            assert gen_proto.serialized_descriptor(committed) == gen_proto.serialized_descriptor(fresh), (
                "rollout_pb2.py is stale: run `make proto` and commit the result"
            )
        same_tool = gen_proto.generator_version(
            open(os.path.join(gen_proto.PACKAGE_DIR, "rollout_pb2.py")).read()
        ) == gen_proto.generator_version(open(tmp_path / "rollout_pb2.py").read())
        if same_tool:  # byte-identical output is only defined for the same generator version
            assert committed == fresh, f"{name} is stale: run `make proto` and commit the result"


def test_stale_check_detects_a_changed_proto(tmp_path):
    """The descriptor comparison above really sees protocol changes (guards against a vacuous test)."""
    src = open(os.path.join(gen_proto.PACKAGE_DIR, "rollout_pb2.py")).read()
    changed = src.replace("min_weight_version", "min_weight_versioX")
    assert gen_proto.serialized_descriptor(src) != gen_proto.serialized_descriptor(changed)


def test_version_gates_are_relaxed():
    """The stubs must import under the older grpcio/protobuf that SGLang environments pin."""
    pb2 = open(os.path.join(gen_proto.PACKAGE_DIR, "rollout_pb2.py")).read()
    grpc_src = open(os.path.join(gen_proto.PACKAGE_DIR, "rollout_pb2_grpc.py")).read()
    assert "ValidateProtobufRuntimeVersion" not in pb2
    assert f"GRPC_GENERATED_VERSION = '{gen_proto.MIN_GRPC_VERSION}'" in grpc_src


def test_codec_roundtrip_prompt_major():
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=6, stop_token_ids=(9,), seed=11)
    back = codec.params_from_proto(codec.params_to_proto(params), 3)
    assert back == SamplingParams(
        n=3,
        temperature=np.float32(0.7).item(),
        top_p=np.float32(0.9).item(),
        top_k=5,
        max_new_tokens=6,
        stop_token_ids=(9,),
        seed=11,
    )
    ro = MockEngine(eos_id=1).generate([[3, 4], [5]], params)
    groups = codec.groups_from_rollouts(ro, ["a", "b"], 3)
    assert [g.prompt_id for g in groups] == ["a", "b"]
    for i, smp in enumerate([*groups[0].samples, *groups[1].samples]):
        smp.reward = float(i)
    out = codec.rollouts_from_groups(groups, 3, pad_id=0)
    np.testing.assert_array_equal(out.completion_lens_R, ro.completion_lens_R)
    np.testing.assert_array_equal(out.completion_ids_RxC, ro.completion_ids_RxC)
    np.testing.assert_allclose(out.logprobs_RxC, ro.logprobs_RxC)
    assert out.finish_reasons == ro.finish_reasons
    np.testing.assert_array_equal(out.group_ids_R, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(out.rewards_R, np.arange(6, dtype=np.float32))


def test_codec_rejects_bad_values():
    with pytest.raises(ValueError, match="top_p"):
        codec.params_from_proto(pb.SamplingParams(top_p=0.0, max_new_tokens=4, temperature=1.0), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        codec.params_from_proto(pb.SamplingParams(top_p=1.0, max_new_tokens=0, temperature=1.0), 2)
    g = pb.Group(
        prompt_id="a",
        samples=[
            pb.Sample(completion_ids=[1], token_logprobs=[-1.0], reward=1.0, finish_reason=pb.FINISH_REASON_STOP),
            pb.Sample(completion_ids=[1], token_logprobs=[-1.0], finish_reason=pb.FINISH_REASON_STOP),
        ],
    )
    with pytest.raises(ValueError, match="some samples carry a reward"):
        codec.rollouts_from_groups([g], 2)
    g2 = pb.Group(prompt_id="a", samples=[pb.Sample(completion_ids=[1, 2], token_logprobs=[-1.0])])
    with pytest.raises(ValueError, match="2 completion ids but 1 log-probs"):
        codec.rollouts_from_groups([g2], 1)
    ro = Rollouts(
        np.zeros((2, 1), np.int32),
        np.ones(2, np.int32),
        np.zeros((2, 1), np.float32),
        [FINISH_STOP, FINISH_LENGTH],
        np.zeros(2, np.int32),
    )
    with pytest.raises(ValueError, match="2 rows for 1 prompts x n=3"):
        codec.groups_from_rollouts(ro, ["a"], 3)
