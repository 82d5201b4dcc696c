"""Benchmark: the jitted ConSPO objective and its gradient w.r.t. token log-probs, against a
straightforward per-group numpy loop computing the same value and gradient (Lemma 2's closed form).

    python bench/objectives.py [--groups 512 --rollouts 16 --tokens 1024 --repeats 7]

Prints both timings (median of --repeats runs after a warm-up, with block_until_ready), their ratio,
the agreement between the two, and the device and library versions. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from conspo_jax.objectives import ObjectiveInputs, get_objective, margin_schedule


def make_batch(groups: int, rollouts: int, tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    num = groups * rollouts
    lengths = rng.integers(1, tokens + 1, num)
    mask = np.arange(tokens)[None, :] < lengths[:, None]
    logp = np.where(mask, -rng.exponential(1.0, (num, tokens)), 0.0).astype(np.float32)
    rewards = (rng.random(num) < rng.random(groups).repeat(rollouts)).astype(np.float32)
    group_ids = np.arange(groups, dtype=np.int32).repeat(rollouts)
    return logp, mask, rewards, group_ids


def numpy_conspo(logp, mask, rewards, group_ids, groups, tau, margin):
    """Eq. 15 averaged over valid groups, and its gradient from Lemma 2, one group at a time."""
    grad = np.zeros_like(logp, dtype=np.float64)
    lengths = mask.sum(1)
    total, n_valid = 0.0, 0
    for g in range(groups):
        idx = np.flatnonzero(group_ids == g)
        s = (np.where(mask[idx], logp[idx], 0.0).sum(1) / np.maximum(lengths[idx], 1)).astype(np.float64)
        pos, neg = rewards[idx] > 0.5, rewards[idx] <= 0.5
        if not pos.any() or not neg.any():
            continue
        n_valid += 1
        sp, sn = (s[pos] - margin) / tau, s[neg] / tau
        shift = max(sp.max(), sn.max())
        neg_sum = np.exp(sn - shift).sum()
        denom = np.exp(sp - shift) + neg_sum  # Z_i, per positive
        total += tau * np.mean(sp - shift - np.log(denom))
        coef = np.zeros(len(idx))
        coef[pos] = (1.0 - np.exp(sp - shift) / denom) / pos.sum()  # (1 - P_i+) / N+
        coef[neg] = -(np.exp(sn - shift)[None, :] / denom[:, None]).sum(0) / pos.sum()  # -sum_i P_ij- / N+
        grad[idx] = np.where(mask[idx], (coef / np.maximum(lengths[idx], 1))[:, None], 0.0)
    n = max(n_valid, 1)
    return total / n, grad / n


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=512)
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--progress", type=float, default=0.5)
    args = parser.parse_args()

    logp, mask, rewards, group_ids = make_batch(args.groups, args.rollouts, args.tokens)
    objective = get_objective("conspo")
    hparams = objective.defaults
    margin = float(
        margin_schedule(args.progress, max_margin=hparams["max_margin"], warmup_ratio=hparams["warmup_ratio"])
    )

    def loss(token_logp, mask, rewards, group_ids, progress):
        inputs = ObjectiveInputs(token_logp=token_logp, mask=mask, rewards=rewards, group_ids=group_ids)
        return objective(inputs, num_groups=args.groups, progress=progress)[0]

    step = jax.jit(jax.value_and_grad(loss))
    device_args = jax.device_put((logp, mask, rewards, group_ids, jnp.float32(args.progress)))
    start = time.perf_counter()
    value, grad = jax.block_until_ready(step(*device_args))
    compile_s = time.perf_counter() - start
    jax_s = median_time(lambda: jax.block_until_ready(step(*device_args)), args.repeats)

    np_value, np_grad = numpy_conspo(logp, mask, rewards, group_ids, args.groups, hparams["tau"], margin)
    np_s = median_time(
        lambda: numpy_conspo(logp, mask, rewards, group_ids, args.groups, hparams["tau"], margin), args.repeats
    )

    device = jax.devices()[0]
    cpu = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(
        f"shape            {args.groups} groups x {args.rollouts} rollouts x {args.tokens} tokens "
        f"({args.groups * args.rollouts} rollouts), tau={hparams['tau']}, margin={margin:.4g}"
    )
    print(
        f"device           {device.platform}:{device.device_kind} ({jax.device_count()} devices), "
        f"host CPU {cpu}, {os.cpu_count()} cores"
    )
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    print(f"host             {platform.node()}{load}")
    print(
        f"versions         jax {jax.__version__}, jaxlib {jax.lib.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}"
    )
    print(
        f"agreement        |J_jax - J_np| = {abs(float(value) - np_value):.2e} (J = {np_value:.6f}), "
        f"max |grad_jax - grad_np| = {np.abs(np.asarray(grad) - np_grad).max():.2e}"
    )
    print(
        f"jax jit          {jax_s * 1e3:9.2f} ms  (value + grad, median of {args.repeats}; first call "
        f"incl. compile {compile_s:.2f} s)"
    )
    print(f"numpy loop       {np_s * 1e3:9.2f} ms  (value + grad, per-group loop, median of {args.repeats})")
    print(f"speed-up         {np_s / jax_s:9.1f} x")


if __name__ == "__main__":
    main()
