"""Supervised warm start: a short next-token phase on (prompt, target) pairs before RL.

The synthetic demo starts from random weights, where every rollout fails and no group has both a
correct and an incorrect rollout, so a contrastive (or any group-relative) objective has nothing to
learn from. A brief, deliberately incomplete supervised phase brings the pass rate strictly between 0
and 1; RL then has to do the rest. Real checkpoints skip this (``sft.steps = 0``).

With ``sft.target_pass`` set, the phase stops as soon as the expected pass rate at temperature 1 on a
fixed probe of training problems (the mean over problems of p(target | prompt), one teacher-forced
pass) reaches it, with ``sft.steps`` as the cap. A fixed step count lands seeds far apart, because a
tiny model learns the task in a sudden jump whose timing depends on the seed; a target makes every seed
start RL from about the same pass rate, which is what a paired study needs.

With ``sft.cache_dir`` set, the warm start is computed once and reused: a study runs every method of one
seed from the same warm-started parameters (paired seeds), and only the first run pays for it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from conspo_jax.base import distributed
from conspo_jax.base.configs import UsageError
from conspo_jax.models import token_logprobs
from conspo_jax.train.step import state_shardings, warmup_then_constant

log = logging.getLogger(__name__)


def _sft_loss(params, graphdef, rest, ids, attn, target_mask):
    model = nnx.merge(graphdef, params, rest)
    logp = token_logprobs(model, ids, attn)
    return -jnp.sum(logp * target_mask) / jnp.maximum(jnp.sum(target_mask), 1.0)


@functools.partial(jax.jit, static_argnums=(1,))
def _pass_rate(params, graphdef, rest, ids, attn, target_mask):
    """Mean over rows of p(target | prompt): the pass rate of exact-match sampling at temperature 1."""
    model = nnx.merge(graphdef, params, rest)
    logp_BxT = token_logprobs(model, ids, attn)
    return jnp.mean(jnp.exp(jnp.sum(logp_BxT * target_mask, axis=-1)))


@functools.partial(jax.jit, static_argnums=(2, 5), donate_argnums=(0, 1))
def _sft_step(params, opt_state, graphdef, rest, batch, optimizer):
    loss, grads = jax.value_and_grad(_sft_loss)(params, graphdef, rest, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def encode_sft(records, encode, target, tokenizer, width: int):
    """[N, width] ids / attention / target-token masks (targets end with EOS)."""
    n = len(records)
    ids = np.full((n, width), tokenizer.pad_token_id, np.int32)
    attn = np.zeros((n, width), np.int32)
    tmask = np.zeros((n, width - 1), np.float32)
    for i, r in enumerate(records):
        p = encode(r)
        t = tokenizer(target(r))["input_ids"] + [tokenizer.eos_token_id]
        seq = (p + t)[:width]
        ids[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
        tmask[i, len(p) - 1 : len(seq) - 1] = 1.0  # logp index j predicts token j+1
    return ids, attn, tmask


def warm_start(
    graphdef,
    params,
    rest,
    records,
    encode,
    target,
    tokenizer,
    *,
    steps,
    lr,
    batch_size,
    warmup_steps,
    seed,
    width,
    mesh=None,
    log=None,
    target_pass=0.0,
    check_every=5,
    probe_size=512,
):
    """AdamW steps of supervised training, ``steps`` of them or until the probe's pass rate reaches
    ``target_pass`` (checked every ``check_every`` steps; 0 = never). Returns (params, steps done, pass rate)."""
    ids, attn, tmask = encode_sft(records, encode, target, tokenizer, width)
    optimizer = optax.adamw(warmup_then_constant(lr, max(warmup_steps, 1)), weight_decay=0.0)
    opt_state = jax.jit(optimizer.init)(params)
    if mesh is not None:  # commit every leaf to the mesh so the donated step never recompiles
        opt_state = jax.device_put(opt_state, state_shardings(opt_state, mesh))
    rng = np.random.default_rng(seed)  # the same draws on every process: the batch is replicated
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None

    def on_mesh(arrays):
        if mesh is not None:
            return distributed.to_global(arrays, (replicated,) * len(arrays))
        return jax.tree.map(jnp.asarray, arrays)

    # The first rows, not a draw: the probe must not depend on the seed, so seeds stop at one criterion.
    probe = on_mesh((ids[:probe_size], attn[:probe_size], tmask[:probe_size])) if target_pass else None
    done, rate = 0, float("nan")
    for s in range(steps):
        idx = rng.choice(len(records), size=batch_size, replace=False)
        params, opt_state, loss = _sft_step(
            params, opt_state, graphdef, rest, on_mesh((ids[idx], attn[idx], tmask[idx])), optimizer
        )
        done = s + 1
        if target_pass and check_every and done % check_every == 0:
            rate = float(_pass_rate(params, graphdef, rest, *probe))
        if log is not None and done % 25 == 0:
            log(done, float(loss), rate)
        if rate >= target_pass > 0:  # nan (not yet measured) compares False
            break
    return params, done, rate


def _fingerprint(config) -> dict:
    """What the warm start depends on; a cache made under other settings is refused, not reused."""
    keys = ("seed", "task", "tokenizer")
    out = {k: config[k] for k in keys}
    for section in ("model", "sft", "data"):
        out[section] = json.loads(config[section].to_json_best_effort())
    out["sft"].pop("cache_dir", None)
    # The warm start trains every weight, LoRA or not (LoRA adapters come after it): both share a cache.
    out["model"].pop("lora", None)
    out["max_new_tokens"] = config.rollout.max_new_tokens
    return _without_off_keys(out)


def _without_off_keys(stamp: dict) -> dict:
    """Keys added after caches were first written, dropped at their off values (from a saved stamp too): a
    cache made before or after a key existed matches a config that leaves it off."""
    if not stamp.get("sft", {}).get("target_pass"):
        stamp.get("sft", {}).pop("target_pass", None)
        stamp.get("sft", {}).pop("check_every", None)
    if not stamp.get("data", {}).get("eval"):
        stamp.get("data", {}).pop("eval", None)
    return stamp


def cached_warm_start(graphdef, params, rest, task, tokenizer, *, config, mesh):
    """``warm_start`` with the config's settings, through ``sft.cache_dir`` when one is set."""
    s = config.sft
    cache = os.path.abspath(os.path.expanduser(s.cache_dir)) if s.cache_dir else ""
    stamp = _fingerprint(config)
    # Process 0's view decides, so that every process takes the same path (restore or compute, both collective).
    if cache and distributed.allgather(os.path.isdir(os.path.join(cache, "params")))[0]:
        with open(os.path.join(cache, "fingerprint.json")) as f:
            saved = _without_off_keys(json.load(f))
        if saved != stamp:
            diff = sorted(k for k in set(saved) | set(stamp) if saved.get(k) != stamp.get(k))
            raise UsageError(f"sft.cache_dir={s.cache_dir!r} holds a warm start made with other settings: {diff}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(cache, "params"), target)
        log.info(f"warm start: reused {cache}")
        return restored

    def measured(rate):  # the probe runs only with a target; without one there is no rate to report
        return f", probe pass rate {rate:.3f}" if s.target_pass else ""

    until = f", stopping once the probe's pass rate reaches {s.target_pass}" if s.target_pass else ""
    log.info(f"warm start: up to {s.steps} supervised steps{until} (demo only; see sft.py)")
    t0 = time.time()
    params, done, rate = warm_start(
        graphdef,
        params,
        rest,
        task.train_records,
        task.encode,
        task.sft_target,
        tokenizer,
        steps=s.steps,
        lr=s.lr,
        batch_size=s.batch_size,
        warmup_steps=s.warmup_steps,
        seed=config.seed,
        width=config.data.max_prompt_len + config.rollout.max_new_tokens,
        mesh=mesh,
        log=lambda step, loss, rate: log.info(f"  sft step {step}: loss {loss:.3f}{measured(rate)}"),
        target_pass=s.target_pass,
        check_every=s.check_every,
    )
    log.info(f"warm start done in {time.time() - t0:.0f}s: {done} steps{measured(rate)}")
    if cache:
        _save_cache(cache, params, stamp)
    return params


def _save_cache(cache: str, params, stamp: dict) -> None:
    """Writes under a private name, then renames: runs racing on one seed never see a half cache."""
    os.makedirs(cache, exist_ok=True)
    # Every process joins the Orbax save into process 0's private name; process 0 renames it.
    tmp = os.path.join(cache, f".tmp-{distributed.allgather(os.getpid())[0]}")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, "params"), params, force=True)
    if not distributed.is_primary():
        distributed.barrier("sft_cache_saved")
        return
    with open(os.path.join(tmp, "fingerprint.json"), "w") as f:
        json.dump(stamp, f, indent=2, sort_keys=True)
    try:
        os.rename(os.path.join(tmp, "fingerprint.json"), os.path.join(cache, "fingerprint.json"))
        os.rename(os.path.join(tmp, "params"), os.path.join(cache, "params"))
    except OSError:
        pass  # another run of the same seed finished first; its cache is the same computation
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier("sft_cache_saved")
