"""LoRA through the trainer (``--config.model.lora.rank=8``): only the adapters train, the run exports a PEFT
adapter and a merged checkpoint that agree with each other and leave every other weight as the base has
it, kill -9 and resume is bit-exact, and training through the sidecar reproduces the embedded engine while
each weight sync moves only the adapters' bytes."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conspo_jax.base.configs import load_config_module
from conspo_jax.models import save_hf_policy
from conspo_jax.models.lora import adapter_state, base_policy, state_nbytes
from conspo_jax.models.peft_io import load_peft_adapter
from conspo_jax.run import build
from conspo_jax.train import train
from conspo_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "arith_tiny.py") + ":smoke"
# GRPO with 2 mini-batches: the old-policy log-probs and the clipped ratio run over LoRA weights too.
# The warm start (of the full model, before the adapters) makes some groups mix right and wrong answers.
OVERRIDES = {
    "objective.name": "grpo",
    "model.lora.rank": 8,
    "train.num_steps": 4,
    "train.ckpt_every": 2,
    "train.mini_batches": 2,
    "train.progress_bar": False,
    "eval.at_start": False,
    "eval.every": 0,
    "sft.steps": 200,
    "rollout.n": 8,
}
TIMEOUT_S = 600


def _config(warm, **extra):
    c = load_config_module(SMOKE)
    for key, value in {**OVERRIDES, "sft.cache_dir": warm, **extra}.items():
        section, name = key.rsplit(".", 1)
        node = c
        for part in section.split("."):
            node = node[part]
        node[name] = value
    return c


def _rows(workdir):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(workdir)]


@pytest.fixture(scope="module")
def warm(smoke_warm_cache):
    return smoke_warm_cache  # the 200-step warm start (conftest.py), shared with other modules


@pytest.fixture(scope="module")
def lora_run(warm, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora"))
    train(_config(warm), workdir)
    return workdir


TARGETS = tuple(f".{p}_proj." for p in ("q", "k", "v", "o", "gate", "up", "down"))


def _warm_base(c, warm):
    """The LoRA policy before RL: the seed's init with the shared warm start (``sft.cache_dir``) restored
    into every base weight, as the trainer does, and the adapters as they start (B = 0)."""
    policy = build.build_policy(c, build.build_tokenizer(c), None, c.seed)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(base_policy(policy), nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        nnx.update(policy, ckptr.restore(os.path.join(warm, "params"), target))  # base paths match with LoRA
    return policy


@pytest.fixture(scope="module")
def base_hf(lora_run, warm, tmp_path_factory):
    """The warm-started base (adapters off) as HF tensors, through the same export code."""
    base = base_policy(_warm_base(_config(warm), warm))
    return load_file(os.path.join(save_hf_policy(base, str(tmp_path_factory.mktemp("base"))), "model.safetensors"))


def test_only_the_adapters_train_and_both_exports_agree(lora_run, base_hf, warm, tmp_path):
    c = _config(warm)
    # The checkpoint holds the adapters (and their Adam moments) only: the base comes from the config.
    saved = ocp.PyTreeCheckpointer().metadata(os.path.join(lora_run, "checkpoints", "4", "state")).item_metadata
    assert list(saved["params"]) == ["layers"], list(saved["params"])
    names = sorted(saved["params"]["layers"])
    assert names == sorted(f"{t}_lora_{s}" for t in ("q", "k", "v", "o", "gate", "up", "down") for s in "ab")

    # The run trained its base (the warm start): it exports that base, and the adapter names it.
    exported_base = load_file(os.path.join(lora_run, "base", "model.safetensors"))
    assert exported_base.keys() == base_hf.keys()
    for k in base_hf:
        np.testing.assert_array_equal(exported_base[k], base_hf[k], err_msg=k)
    with open(os.path.join(lora_run, "adapter", "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.join(lora_run, "base")
    merged = load_file(os.path.join(lora_run, "hf", "model.safetensors"))
    # The warm-started base with the run's PEFT adapter loaded, merged by our export: the run's merged checkpoint.
    policy = load_peft_adapter(_warm_base(c, warm), f"{lora_run}/adapter")
    again = load_file(os.path.join(save_hf_policy(policy, str(tmp_path / "again")), "model.safetensors"))
    assert again.keys() == merged.keys() == base_hf.keys()
    # B starts at 0, so the adapters move the merged weights only if some update had a gradient.
    learned = any(r["grad_norm"] > 0 for r in read_metrics(lora_run))
    print(f"a gradient at some step: {learned}")
    for k in merged:
        np.testing.assert_allclose(again[k], merged[k], rtol=0, atol=1e-6, err_msg=k)
        if any(t in k for t in TARGETS) and k.endswith(".weight"):  # q/k/v biases have no adapter
            assert np.array_equal(merged[k], base_hf[k]) == (not learned), k
        else:  # embeddings, norms, biases: frozen, bit for bit
            np.testing.assert_array_equal(merged[k], base_hf[k], err_msg=k)


def _cli_args(warm, workdir):
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "sft.cache_dir": warm}.items()]
    return [sys.executable, "-m", "conspo_jax", "train", "--config", SMOKE, *flags, "--workdir", workdir]


def test_kill_9_and_resume_with_lora_is_bit_exact(lora_run, warm, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen(_cli_args(warm, workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = os.path.join(workdir, "checkpoints", "2")  # Orbax renames a step's directory once it is complete
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not os.path.isdir(ckpt) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert os.path.isdir(ckpt), "no step-2 checkpoint: " + proc.communicate(timeout=60)[0].decode()[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert not os.path.exists(os.path.join(workdir, "hf")), "the run finished before it was killed"
    train(_config(warm), workdir)  # the same run again resumes from the step-2 checkpoint
    assert _rows(workdir) == _rows(lora_run)
    for name in ("hf/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(os.path.join(lora_run, name)), load_file(os.path.join(workdir, name))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")


def test_sidecar_training_matches_embedded_and_syncs_only_the_adapters(warm, tmp_path):
    from tests.test_sidecar_jax import assert_sidecar_training_matches_embedded

    def config():
        return _config(warm, **{"objective.name": "conspo", "train.mini_batches": 1})

    emb, side = assert_sidecar_training_matches_embedded(config, tmp_path, steps=2)
    c = config()
    policy = build.build_policy(c, build.build_tokenizer(c), None, c.seed)
    adapter_bytes = state_nbytes(adapter_state(nnx.state(policy)))
    full_bytes = state_nbytes(nnx.state(policy, nnx.Param)) - adapter_bytes
    for r in side:
        # The adapter tensors plus safetensors' JSON header and adapter_config.json, nothing of the base.
        assert adapter_bytes <= r["sync/bytes"] <= adapter_bytes + 64 * 1024, (r["sync/bytes"], adapter_bytes)
    print(f"LoRA sync {side[0]['sync/bytes'] / 1e6:.3f} MB, the full weights {full_bytes / 1e6:.3f} MB")
    assert side[0]["sync/bytes"] < 0.5 * full_bytes


def test_overlapped_lora_run_samples_one_version_old_and_resumes_exactly(warm, tmp_path):
    """rollout.async_steps=1 with TIS under LoRA: the engine merges the adapters of the version before the
    trainer's, and a run stopped after its step-2 checkpoint resumes to the uninterrupted run's end."""
    extra = {"rollout.async_steps": 1, "rollout.tis_cap": 2.0, "objective.name": "conspo", "train.mini_batches": 1}
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train(_config(warm, **extra), full)
    rows = _rows(full)
    assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    train(_config(warm, **extra, **{"train.stop_after": 2}), split)
    train(_config(warm, **extra), split)
    assert _rows(split) == rows
    a, b = (
        load_file(f"{full}/adapter/adapter_model.safetensors"),
        load_file(f"{split}/adapter/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
