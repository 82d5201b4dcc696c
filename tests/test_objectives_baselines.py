"""Every registered objective against an independent plain-numpy/loop implementation of its paper's
formula (value, and gradient by central finite differences of that numpy value), plus the invariances
the trainer relies on: exact micro-batch recombination through aux["normalizer"], permutation of
rollouts and group labels, and padding. All in float64; one compiled function per (objective, hparams)
serves every test at one static shape.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conspo_jax.objectives import ObjectiveInputs, get_objective, list_objectives

R, T, G = 12, 7, 5
PROGRESS = 0.2

# (objective, hyperparameters): every objective at its defaults, plus the variants whose code paths
# differ (other scores, estimators, scopes, bounds), and ranges wide enough that not everything clips.
CASES = [
    ("conspo", {}),
    ("conspo", {"tau": 0.5, "max_margin": 0.3, "warmup_ratio": 0.5}),
    ("conspo_no_margin", {}),
    ("conspo_fixed_margin", {"margin": 0.2, "tau": 1.0}),
    ("conspo_no_loglik", {"tau": 0.3, "max_margin": 0.05}),
    ("conspo_no_contrastive", {}),
    ("grpo", {}),
    ("grpo", {"beta": 0.04, "eps_high": 0.28}),
    ("dapo", {}),
    ("dapo", {"dynamic_sampling": False}),
    ("dr_grpo", {}),
    ("dr_grpo", {"length_normalizer": 16.0}),
    ("disco", {}),
    ("disco", {"score": "Lratio", "tau": 1.0, "kl_estimator": "k3", "beta": 10.0, "delta": 0.01}),
    ("disco", {"kl_scope": "batch", "beta": 10.0, "delta": 0.01}),
    ("gmpo", {}),
    ("gmpo", {"eps_low": 0.1, "eps_high": 0.2}),
    ("cispo", {}),
    ("cispo", {"eps_low": 0.2, "eps_high": 0.1}),
    ("sapo", {}),
    ("gspo", {}),
    ("gspo", {"eps_low": 0.1, "eps_high": 0.1}),
]
# The batch-scope DisCO penalty is one hinge of the whole (micro-)batch KL: by design not decomposable.
SPLIT = ({0, 2}, {1, 3, 4})  # two micro-batches of whole groups, 6 rows each
NOT_DECOMPOSABLE = {("disco", (("beta", 10.0), ("delta", 0.01), ("kl_scope", "batch")))}


def _key(name, hparams):
    return name, tuple(sorted(hparams.items()))


def make_batch(seed=0):
    """Five groups of sizes 4, 3, 2, 1, 1 (mixed, mixed, all-correct, single wrong, single right), one
    padding rollout, a zero-length response, non-binary rewards, junk (-inf / NaN / 1e9) in every padded
    slot, shuffled rows. (Micro-batches leave groups empty.)"""
    rng = np.random.default_rng(seed)
    gids = np.array([0] * 4 + [1] * 3 + [2] * 2 + [3] + [4] + [1])
    rewards = np.array([1, 0, 1, 0, 1.0, 0.7, 0, 1, 1, 0, 1, 1])
    rmask = np.array([True] * 11 + [False])
    lens = rng.integers(1, T + 1, R)
    lens[3] = 0  # a zero-length negative in the valid group 0
    perm = rng.permutation(R)
    gids, rewards, rmask, lens = gids[perm], rewards[perm], rmask[perm], lens[perm]
    mask = np.arange(T)[None, :] < lens[:, None]
    logp = -rng.uniform(0.05, 2.0, (R, T))
    old = logp + rng.normal(0.0, 0.25, (R, T))
    ref = logp + rng.normal(0.0, 0.25, (R, T))
    logp = np.where(mask, logp, -np.inf)
    old = np.where(mask, old, 1e9)
    ref = np.where(mask, ref, np.nan)
    logp[~rmask] = np.nan
    return dict(logp=logp, old=old, ref=ref, mask=mask, rewards=rewards, gids=gids, rmask=rmask)


# ---------------------------------------------------------------- independent numpy references


def _groups(b):
    out = {}
    for i in range(R):
        if b["rmask"][i]:
            out.setdefault(int(b["gids"][i]), []).append(i)
    return out


def _toks(b, i):
    return [t for t in range(T) if b["mask"][i, t]]


def _adv(b, idx, std=True):
    r = [float(b["rewards"][i]) for i in idx]
    mu = sum(r) / len(r)
    if max(r) == min(r):
        return {i: 0.0 for i in idx}
    sd = math.sqrt(sum((x - mu) ** 2 for x in r) / len(r)) if std else 1.0
    return {i: (float(b["rewards"][i]) - mu) / sd for i in idx}


def _lr(b, i, t):
    return b["logp"][i, t] - b["old"][i, t]


def _ll(b, i):
    ts = _toks(b, i)
    return sum(b["logp"][i, t] for t in ts) / len(ts) if ts else 0.0


def _pos_neg(b, idx, thr=0.5):
    return [i for i in idx if b["rewards"][i] > thr], [i for i in idx if b["rewards"][i] <= thr]


def _clip_score(b, i, positive, el, eh):
    ts = _toks(b, i)
    if not ts:
        return 0.0
    f = (lambda r: min(r, 1 + eh)) if positive else (lambda r: max(r, 1 - el))
    return sum(f(math.exp(_lr(b, i, t))) for t in ts) / len(ts)


def ref_infonce(b, tau, margin, score):
    total, n = 0.0, 0
    for idx in _groups(b).values():
        pos, neg = _pos_neg(b, idx)
        if not pos or not neg:
            continue
        negsum = sum(math.exp(score(i, False) / tau) for i in neg)
        acc = 0.0
        for i in pos:
            e = math.exp((score(i, True) - margin) / tau)
            acc += tau * math.log(e / (e + negsum))
        total += acc / len(pos)
        n += 1
    return total / n if n else 0.0


def ref_linear(b):
    total, n = 0.0, 0
    for idx in _groups(b).values():
        pos, neg = _pos_neg(b, idx)
        if not pos or not neg:
            continue
        p = len(pos) / len(idx)
        gap = sum(_ll(b, i) for i in pos) / len(pos) - sum(_ll(b, j) for j in neg) / len(neg)
        total += math.sqrt(p * (1 - p)) * gap
        n += 1
    return total / n if n else 0.0


def _ppo_f(rho, a, el, eh):
    return min(rho * a, min(max(rho, 1 - el), 1 + eh) * a)


def ref_grpo(b, eps_low=0.2, eps_high=0.2, beta=0.0):
    groups = _groups(b)
    total = 0.0
    for idx in groups.values():
        adv = _adv(b, idx)
        acc = 0.0
        for i in idx:
            ts = _toks(b, i)
            s = 0.0
            for t in ts:
                s += _ppo_f(math.exp(_lr(b, i, t)), adv[i], eps_low, eps_high)
                if beta:
                    x = b["ref"][i, t] - b["logp"][i, t]
                    s -= beta * (math.exp(x) - x - 1)
            acc += s / len(ts) if ts else 0.0
        total += acc / len(idx)
    return total / len(groups)


def ref_dr_grpo(b, eps_low=0.2, eps_high=0.2, length_normalizer=0.0):
    big_l = length_normalizer or T
    groups = _groups(b)
    total = 0.0
    for idx in groups.values():
        adv = _adv(b, idx, std=False)
        acc = sum(_ppo_f(math.exp(_lr(b, i, t)), adv[i], eps_low, eps_high) for i in idx for t in _toks(b, i))
        total += acc / big_l / len(idx)
    return total / len(groups)


def ref_dapo(b, eps_low=0.2, eps_high=0.28, dynamic_sampling=True):
    num, den = 0.0, 0
    for idx in _groups(b).values():
        r = [b["rewards"][i] for i in idx]
        if dynamic_sampling and max(r) == min(r):
            continue
        adv = _adv(b, idx)
        for i in idx:
            for t in _toks(b, i):
                num += _ppo_f(math.exp(_lr(b, i, t)), adv[i], eps_low, eps_high)
                den += 1
    return num / den


def ref_gmpo(b, eps_low=0.4, eps_high=0.4):
    groups = _groups(b)
    total = 0.0
    for idx in groups.values():
        adv = _adv(b, idx)
        acc = 0.0
        for i in idx:
            ts = _toks(b, i)
            if adv[i] > 0:
                logs = [min(_lr(b, i, t), eps_high) for t in ts]
            else:
                logs = [max(_lr(b, i, t), -eps_low) for t in ts]
            acc += adv[i] * math.exp(sum(logs) / len(ts) if ts else 0.0)
        total += acc / len(idx)
    return total / len(groups)


def ref_cispo(b, eps_low=1.0, eps_high=0.28):
    lo = max(1 - eps_low, 0.0)
    num, den = 0.0, 0
    for idx in _groups(b).values():
        adv = _adv(b, idx)
        for i in idx:
            for t in _toks(b, i):
                w = min(max(math.exp(_lr(b, i, t)), lo), 1 + eps_high)
                num += w * adv[i] * b["logp"][i, t]
                den += 1
    return num / den


def ref_sapo(b, tau_pos=1.0, tau_neg=1.05):
    groups = _groups(b)
    total = 0.0
    for idx in groups.values():
        adv = _adv(b, idx)
        acc = 0.0
        for i in idx:
            tau = tau_pos if adv[i] > 0 else tau_neg
            ts = _toks(b, i)
            gate = [4 / tau / (1 + math.exp(-tau * (math.exp(_lr(b, i, t)) - 1))) for t in ts]
            acc += sum(g * adv[i] for g in gate) / len(ts) if ts else 0.0
        total += acc / len(idx)
    return total / len(groups)


def ref_gspo(b, eps_low=3e-4, eps_high=4e-4):
    groups = _groups(b)
    total = 0.0
    for idx in groups.values():
        adv = _adv(b, idx)
        acc = 0.0
        for i in idx:
            ts = _toks(b, i)
            s = math.exp(sum(_lr(b, i, t) for t in ts) / len(ts)) if ts else 1.0
            acc += min(s * adv[i], min(max(s, 1 - eps_low), 1 + eps_high) * adv[i])
        total += acc / len(idx)
    return total / len(groups)


def ref_disco(b, score="logL", tau=10.0, delta=1e-4, beta=1e3, kl_estimator="k1", kl_scope="group"):

    def s(i):
        ts = _toks(b, i)
        if not ts:
            return 0.0
        if score == "logL":
            return _ll(b, i)
        return sum(math.exp(_lr(b, i, t)) for t in ts) / len(ts)

    def kl_tok(i, t):
        x = _lr(b, i, t)
        return -x if kl_estimator == "k1" else math.exp(x) - 1 - x

    groups = _groups(b)
    total, all_kl, all_n = 0.0, 0.0, 0
    for idx in groups.values():
        pos, neg = _pos_neg(b, idx)
        term = 0.0
        if pos and neg:
            lme = math.log(sum(math.exp(s(j) / tau) for j in neg) / len(neg))
            term = sum(s(i) for i in pos) / len(pos) - tau * lme
        kl_sum = sum(kl_tok(i, t) for i in idx for t in _toks(b, i))
        n_tok = sum(len(_toks(b, i)) for i in idx)
        all_kl, all_n = all_kl + kl_sum, all_n + n_tok
        if kl_scope == "group":
            kl_g = kl_sum / n_tok if n_tok else 0.0
            term -= beta * max(kl_g - delta, 0.0) ** 2
        total += term
    value = total / len(groups)
    if kl_scope == "batch":
        value -= beta * max(all_kl / all_n - delta, 0.0) ** 2
    return value


def reference(name, b, hp):
    hp = dict(hp)
    if name in ("conspo", "conspo_no_loglik"):
        tau = hp.pop("tau", 10.0)
        max_margin, alpha = hp.pop("max_margin", 0.01), hp.pop("warmup_ratio", 0.3)
        m = max_margin / 2 * (1 - math.cos(math.pi * min(PROGRESS / alpha, 1.0)))  # Eq. 16
        if name == "conspo":
            return ref_infonce(b, tau, m, lambda i, _: _ll(b, i))
        el, eh = hp.pop("eps_low", 0.2), hp.pop("eps_high", 0.2)
        return ref_infonce(b, tau, m, lambda i, pos: _clip_score(b, i, pos, el, eh))
    if name == "conspo_no_margin":
        return ref_infonce(b, hp.get("tau", 10.0), 0.0, lambda i, _: _ll(b, i))
    if name == "conspo_fixed_margin":
        return ref_infonce(b, hp.get("tau", 10.0), hp.get("margin", 0.01), lambda i, _: _ll(b, i))
    if name == "conspo_no_contrastive":
        return ref_linear(b)
    fns = dict(
        grpo=ref_grpo,
        dr_grpo=ref_dr_grpo,
        dapo=ref_dapo,
        gmpo=ref_gmpo,
        cispo=ref_cispo,
        sapo=ref_sapo,
        gspo=ref_gspo,
        disco=ref_disco,
    )
    return fns[name](b, **hp)


def ref_cispo_grad(b, eps_low=1.0, eps_high=0.28):
    """CISPO's weight is stop-gradient by definition, so finite differences of its value cannot give
    its gradient: d/d logp_it = w_it A_i / (number of tokens)."""
    lo = max(1 - eps_low, 0.0)
    grad = np.zeros((R, T))
    n_tok = sum(len(_toks(b, i)) for idx in _groups(b).values() for i in idx)
    for idx in _groups(b).values():
        adv = _adv(b, idx)
        for i in idx:
            for t in _toks(b, i):
                grad[i, t] = min(max(math.exp(_lr(b, i, t)), lo), 1 + eps_high) * adv[i] / n_tok
    return grad


def fd_grad(name, b, hp, h=1e-6):
    """Central differences of the numpy reference w.r.t. every real completion token's log-prob."""
    if name == "cispo":
        return ref_cispo_grad(b, **hp)
    grad = np.zeros((R, T))
    for i in range(R):
        if not b["rmask"][i]:
            continue
        for t in _toks(b, i):
            vals = []
            for sign in (1, -1):
                bb = dict(b, logp=b["logp"].copy())
                bb["logp"][i, t] += sign * h
                vals.append(reference(name, bb, hp))
            grad[i, t] = (vals[0] - vals[1]) / (2 * h)
    return grad


# ---------------------------------------------------------------- the library under test

_FIELDS = ("logp", "old", "ref", "mask", "rewards", "gids", "rmask")


def run_stacked(name, cases, batches):
    """value_and_grad of every case of one objective on several same-shape batches, in ONE compiled
    function: XLA compiles dominate this suite's time, so each objective compiles once (at a low
    backend optimisation level, which changes speed, not results)."""
    obj = get_objective(name)

    def one(hp):
        def f(logp, old, ref, mask, rewards, gids, rmask):
            inputs = ObjectiveInputs(
                token_logp=logp,
                old_logp=old,
                ref_logp=ref,
                mask=mask,
                rewards=rewards,
                group_ids=gids,
                rollout_mask=rmask,
            )
            return obj(inputs, num_groups=G, progress=PROGRESS, **hp)

        return jax.vmap(jax.value_and_grad(f, has_aux=True))

    def all_cases(*stacked):
        return [one(hp)(*stacked) for hp in cases]

    stacked = [jnp.asarray(np.stack([b[k] for b in batches])) for k in _FIELDS]
    compiled = jax.jit(all_cases).lower(*stacked).compile({"xla_backend_optimization_level": 0})
    out = []
    for (values, aux), grads in compiled(*stacked):
        out.append((np.asarray(values), {k: np.asarray(v) for k, v in aux.items()}, np.asarray(grads)))
    return out


def test_cases_cover_every_registered_objective():
    assert {name for name, _ in CASES} == set(list_objectives())


def _micro_batches(b):
    """The batch split into two micro-batches of whole groups (same shapes, the rest masked out).
    The split is lopsided (1 valid of 2 groups vs 1 valid of 3) so a wrong normaliser cannot cancel."""
    return [dict(b, rmask=b["rmask"] & np.isin(b["gids"], list(groups))) for groups in SPLIT]


def _permuted(b, seed=3):
    """Rollouts shuffled and group labels relabelled; returns the batch and the row permutation."""
    rng = np.random.default_rng(seed)
    perm, relabel = rng.permutation(R), rng.permutation(G)
    out = {k: v[perm] for k, v in b.items()}
    out["gids"] = relabel[out["gids"]]
    return out, perm


@pytest.mark.parametrize("name", sorted({n for n, _ in CASES}))
def test_objective(name):
    """Per case: value == numpy reference, gradient == finite differences of it, zero gradient on
    padding; micro-batches of whole groups recombine exactly through aux["normalizer"]; permuting
    rollouts together with relabelled groups changes nothing."""
    b = make_batch()
    permuted, perm = _permuted(b)
    batches = [b, *_micro_batches(b), permuted]
    cases = [hp for n, hp in CASES if n == name]
    with jax.enable_x64(True):
        results = run_stacked(name, cases, batches)
    for hp, (values, aux, grads) in zip(cases, results):
        label = f"{name}{hp}"
        value, grad = values[0], grads[0]

        np.testing.assert_allclose(value, reference(name, b, hp), rtol=1e-9, atol=1e-12, err_msg=label)
        np.testing.assert_allclose(grad, fd_grad(name, b, hp), rtol=1e-5, atol=1e-7, err_msg=label)
        assert np.all(grad[~b["mask"]] == 0.0), f"{label}: padding tokens must get exactly zero gradient"
        assert np.all(grad[~b["rmask"]] == 0.0), f"{label}: padding rollouts must get zero gradient"
        assert np.any(grad != 0.0), f"{label}: the case must exercise a gradient"
        assert all(np.all(np.isfinite(v)) for v in aux.values()), label

        if _key(name, hp) not in NOT_DECOMPOSABLE:
            n = aux["normalizer"][1:3]
            assert n.sum() == aux["normalizer"][0] > 0, label
            np.testing.assert_allclose(
                (values[1:3] * n).sum() / n.sum(), value, rtol=1e-12, atol=1e-13, err_msg=f"{label}: micro-batch value"
            )
            np.testing.assert_allclose(
                (grads[1:3] * n[:, None, None]).sum(0) / n.sum(),
                grad,
                rtol=1e-11,
                atol=1e-13,
                err_msg=f"{label}: micro-batch gradient",
            )

        np.testing.assert_allclose(values[3], value, rtol=1e-12, atol=1e-14, err_msg=f"{label}: permuted")
        np.testing.assert_allclose(grads[3], grad[perm], rtol=1e-11, atol=1e-14, err_msg=f"{label}: permuted")
        for k, v in aux.items():
            np.testing.assert_allclose(v[3], v[0], rtol=1e-11, atol=1e-14, err_msg=f"{label}: aux {k}")


def test_physical_micro_batches_recombine_to_the_full_batch_reference():
    """What the trainer does: slice the rows of whole groups into two smaller batches (6 rows each here),
    evaluate each, and combine with aux["normalizer"]; the result must be the full batch's value and
    gradient, here taken from the independent numpy reference. One compile serves every case."""
    b = make_batch(seed=4)
    parts = [np.flatnonzero(np.isin(b["gids"], list(groups))) for groups in SPLIT]
    assert [len(p) for p in parts] == [6, 6]
    cases = [(name, hp) for name, hp in CASES if _key(name, hp) not in NOT_DECOMPOSABLE]

    def all_cases(logp, old, ref, mask, rewards, gids, rmask):
        out = []
        for name, hp in cases:
            obj = get_objective(name)
            inputs = ObjectiveInputs(
                token_logp=logp,
                old_logp=old,
                ref_logp=ref,
                mask=mask,
                rewards=rewards,
                group_ids=gids,
                rollout_mask=rmask,
            )
            out.append(
                jax.value_and_grad(
                    lambda x: obj(inputs.replace(token_logp=x), num_groups=G, progress=PROGRESS, **hp), has_aux=True
                )(logp)
            )
        return out

    with jax.enable_x64(True):
        sliced = [[jnp.asarray(b[k][rows]) for k in _FIELDS] for rows in parts]
        compiled = jax.jit(all_cases).lower(*sliced[0]).compile({"xla_backend_optimization_level": 0})
        results = [compiled(*args) for args in sliced]
    for c, (name, hp) in enumerate(cases):
        (v0, aux0), g0 = results[0][c]
        (v1, aux1), g1 = results[1][c]
        n0, n1 = float(aux0["normalizer"]), float(aux1["normalizer"])
        grad = np.zeros((R, T))
        grad[parts[0]] = np.asarray(g0) * n0 / (n0 + n1)
        grad[parts[1]] = np.asarray(g1) * n1 / (n0 + n1)
        label = f"{name}{hp}"
        np.testing.assert_allclose(
            (float(v0) * n0 + float(v1) * n1) / (n0 + n1), reference(name, b, hp), rtol=1e-9, atol=1e-12, err_msg=label
        )
        np.testing.assert_allclose(grad, fd_grad(name, b, hp), rtol=1e-5, atol=1e-7, err_msg=label)
