"""End-to-end check of a real sidecar process: ``python scripts/sglang_check.py``.

Builds a tiny random Qwen2 checkpoint (no download) with the synthetic task's tokenizer, starts
``python -m conspo_jax.sidecar --engine sglang`` (or ``--engine jax``) on 127.0.0.1, and checks, as
the trainer would use it:

1. verified groups come back prompt-major, with finite log-probs <= 0 and distinct samples per group;
2. after ``update_weights`` (safetensors export + PushWeights) the engine's log-probs of its own
   tokens match the JAX trainer's (``token_logprobs``) -- mean |Δ logp| is printed and bounded --
   and are far from the previous weights';
3. older weight versions are deleted once the new one is acknowledged.

Prints one JSON line of measurements and exits 0 on success. ``scripts/sglang_e2e.sh`` runs it on a
GPU machine where ``import sglang`` works.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

_CONFIG_TEMPLATE = """
from conspo_jax.train.config_base import base_config


def get_config(arg=None):
    c = base_config()
    c.task = "arith"
    c.tokenizer = {model!r}
    c.model.path = {model!r}
    c.model.dtype = "float32"
    c.rollout.prompt_bucket = 16
    c.rollout.sidecar.sglang = {sglang_kwargs!r}
    return c
"""


def _tiny_checkpoints(workdir: str):
    """Two random tiny-Qwen2 policies; the first is saved (with tokenizer) as the initial model."""
    import jax.numpy as jnp

    from conspo_jax.data.arith import build_arith_tokenizer
    from conspo_jax.models import get_model_config, init_policy
    from conspo_jax.models.hf_io import save_hf_policy

    tok = build_arith_tokenizer()
    # head_dim 64 and a vocab padded to 64 keep every SGLang attention backend and kernel happy.
    cfg = get_model_config(
        "tiny-qwen2",
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_heads=2,
        num_kv_heads=1,
        head_dim=64,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    policies = [init_policy(cfg, seed=s, dtype=jnp.float32, param_dtype=jnp.float32) for s in (0, 1)]
    model_dir = os.path.join(workdir, "init_model")
    save_hf_policy(policies[0], model_dir, dtype="float32")
    tok.save_pretrained(model_dir)
    return tok, model_dir, policies


def _start_sidecar(engine, config_path, port, weights_dir, token, timeout_s):
    env = dict(os.environ, CONSPO_SIDECAR_TOKEN=token)
    cmd = [
        sys.executable,
        "-m",
        "conspo_jax.sidecar",
        "--engine",
        engine,
        "--config",
        config_path,
        "--port",
        str(port),
        "--weights-dir",
        weights_dir,
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    ready = threading.Event()
    target = []

    def watch():
        for line in proc.stdout:  # the sidecar's own logs go to stderr, untouched
            if line.startswith("SIDECAR READY"):
                target.append(line.split()[-1])  # host:port, the real port when asked for 0
                ready.set()

    threading.Thread(target=watch, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(1.0):
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with code {proc.returncode} before serving: {' '.join(cmd)}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"sidecar did not start within {timeout_s}s: {' '.join(cmd)}")
    return proc, target[0]


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def run(engine: str, workdir: str, port: int, sglang_kwargs: dict, tolerance: float, start_timeout_s: float) -> dict:
    from conspo_jax.data.arith import arith_prompt, make_arith_records
    from conspo_jax.objectives import logprob_mismatch
    from conspo_jax.rollout.engine import SamplingParams
    from conspo_jax.rollout.sidecar_client import SidecarClient
    from conspo_jax.train.step import trainer_logprobs

    tok, model_dir, (init_policy_, trainer_policy) = _tiny_checkpoints(workdir)
    config_path = os.path.join(workdir, "sidecar_config.py")
    with open(config_path, "w") as f:
        f.write(_CONFIG_TEMPLATE.format(model=model_dir, sglang_kwargs=sglang_kwargs))
    weights_dir = os.path.join(workdir, "weights")
    token = os.urandom(16).hex()
    records = make_arith_records("train", num=8, seed=0)
    prompts = [[tok.bos_token_id] + tok(arith_prompt(r["problem"]))["input_ids"] for r in records]
    answers = [r["answer"] for r in records]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, stop_token_ids=(tok.eos_token_id,), seed=7)
    out = {"engine": engine, "sglang_kwargs": sglang_kwargs}

    t0 = time.perf_counter()
    proc, target = _start_sidecar(engine, config_path, port, weights_dir, token, start_timeout_s)
    out["startup_s"] = round(time.perf_counter() - t0, 2)
    try:
        with SidecarClient(target, token=token, verifier="arith", weights=weights_dir, deadline_s=600) as client:
            t0 = time.perf_counter()
            ro = client.generate(prompts, params, answers=answers)
            out["generate_s"] = round(time.perf_counter() - t0, 3)
            mask = ro.completion_mask_RxC()
            assert ro.num_rows == len(prompts) * params.n, ro.num_rows
            assert np.all(np.isfinite(ro.logprobs_RxC)) and np.all(ro.logprobs_RxC[mask] <= 1e-6)
            assert set(np.unique(ro.rewards_R).tolist()) <= {0.0, 1.0}
            comps = ro.completions()
            distinct = [len({tuple(c) for c in comps[p * params.n : (p + 1) * params.n]}) for p in range(len(prompts))]
            assert min(distinct) > 1, f"samples of a group are identical (seeds not distinct?): {distinct}"
            out["tokens"] = int(mask.sum())
            out["init_mismatch_mean"] = float(
                logprob_mismatch(trainer_logprobs(init_policy_, prompts, ro), ro.logprobs_RxC, mask)
            )

            t0 = time.perf_counter()
            client.push_policy(trainer_policy, 1)
            out["push_s"] = round(time.perf_counter() - t0, 3)
            assert client.health().weight_version == 1
            assert sorted(os.listdir(weights_dir)) == ["v000001"], os.listdir(weights_dir)
            ro = client.generate(prompts, params, answers=answers)
            mask = ro.completion_mask_RxC()
            assert ro.weight_version == 1
            new = float(logprob_mismatch(trainer_logprobs(trainer_policy, prompts, ro), ro.logprobs_RxC, mask))
            old = float(logprob_mismatch(trainer_logprobs(init_policy_, prompts, ro), ro.logprobs_RxC, mask))
            out.update(pushed_mismatch_mean=new, pushed_vs_old_weights_mismatch_mean=old)
            assert new <= tolerance, f"mean |Δ logp| {new} after the push exceeds {tolerance}"
            assert old > 10 * max(new, 1e-6), f"the push did not change the engine's weights ({old} vs {new})"
            out["sidecar_stats"] = dict(client.stats)
    finally:
        _stop(proc)
    out["ok"] = True
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/sglang_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="sglang", choices=["sglang", "jax"])
    p.add_argument("--workdir", default=None, help="where checkpoints and weights go (default: a temp dir)")
    p.add_argument("--port", type=int, default=0, help="sidecar port; 0 picks a free one")
    p.add_argument(
        "--sglang-kwargs",
        default='{"mem_fraction_static": 0.2, "disable_cuda_graph": true}',
        help="JSON forwarded to sglang.Engine",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="bound on mean |Δ logp| after the push (default 0.05 for sglang; 1e-3 for jax, "
        "whose sampler keeps a bf16 KV cache)",
    )
    p.add_argument("--start-timeout-s", type=float, default=900.0)
    args = p.parse_args(argv)
    tolerance = args.tolerance if args.tolerance is not None else (0.05 if args.engine == "sglang" else 1e-3)
    with tempfile.TemporaryDirectory(prefix="conspo-sidecar-check-") as tmp:
        result = run(
            args.engine, args.workdir or tmp, args.port, json.loads(args.sglang_kwargs), tolerance, args.start_timeout_s
        )
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
