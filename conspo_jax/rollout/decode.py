"""The embedded engine's decode program: continuous batching over a fixed set of device rows.

A rollout batch is P prompts x n samples = P*n (prompt, sample) pairs. They are decoded on `rows` device
rows (at most P*n). Prefill writes a prompt into a free row's cache slots [0, Q) and samples its first
token; decode then runs in jitted chunks of `chunk` tokens. Between chunks the host collects the tokens,
frees the rows that finished and refills them with pending pairs, so the device stays full until the
work runs out; after that, once at most half the rows are busy, the busy rows are compacted into a
smaller row bucket so the tail no longer pays for finished rows.

Each chunk's attention reads only a window of the first W cache slots, W the power-of-two bucket (at
least 64, at most Q + max_new) covering the longest live row by the chunk's end. Sampled token ids are
the same function of the logits as a static batch, so results are identical in distribution and every
row's log-probs are its teacher-forced ones.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conspo_jax.base import distributed
from conspo_jax.rollout.sampling import sample_tokens

MIN_WINDOW = 64


def prepare_sampling_state(state, dtype):
    """A copy of `state` whose floating arrays are in `dtype` (the policy's compute dtype), made once
    when weights arrive so that decode steps read bf16 weights instead of casting fp32 ones every step.
    The forward casts to the compute dtype anyway, so the logits are unchanged."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, state)


@flax.struct.dataclass
class RowState:
    """What each device row is doing. tok: the last sampled token, not yet in the cache; count: tokens
    generated so far (tok included); pos: tok's RoPE position; prompt_mask: real prompt slots."""

    tok_B: jax.Array
    count_B: jax.Array
    pos_B: jax.Array
    done_B: jax.Array
    stopped_B: jax.Array
    prompt_mask_BxQ: jax.Array


def empty_rows(rows: int, plen: int) -> RowState:
    z = np.zeros((rows,), np.int32)
    return RowState(z, z, z, np.ones((rows,), bool), np.zeros((rows,), bool), np.zeros((rows, plen), bool))


def _stop_hit(tok_B, stop_ids):
    return jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)


def prefill(graphdef, state, cache, rows: RowState, idx_N, prompt_NxQ, mask_NxQ, key, samp, stop_ids, *, max_new):
    """Writes N prompts into rows idx_N (>= rows: padding, dropped) and samples their first tokens."""
    from conspo_jax.models import policy_logits
    from conspo_jax.models.cache import prefill_rows

    policy = nnx.merge(graphdef, state)
    h_Nx1xD, cache = prefill_rows(policy, prompt_NxQ, mask_NxQ, idx_N, cache)
    tok_N, logp_N = sample_tokens(policy_logits(policy, h_Nx1xD)[:, 0], key, *samp)
    hit_N = _stop_hit(tok_N, stop_ids)
    pos_N = jnp.sum(mask_NxQ, axis=-1).astype(jnp.int32)

    def put(a, v):
        return a.at[idx_N].set(v, mode="drop")

    rows = RowState(
        tok_B=put(rows.tok_B, tok_N),
        count_B=put(rows.count_B, jnp.ones_like(tok_N)),
        pos_B=put(rows.pos_B, pos_N),
        done_B=put(rows.done_B, hit_N | (max_new <= 1)),
        stopped_B=put(rows.stopped_B, hit_N),
        prompt_mask_BxQ=put(rows.prompt_mask_BxQ, mask_NxQ.astype(bool)),
    )
    return cache, rows, tok_N, logp_N


def decode_chunk(graphdef, state, cache, rows: RowState, key, samp, stop_ids, *, steps, window, max_new, pad_id):
    """Up to `steps` decode steps (fewer once every row is done). Returns (cache, rows, ids_BxK, logp_BxK);
    ids are pad_id where a row was already done."""
    from conspo_jax.models import policy_logits
    from conspo_jax.models.cache import forward_decode_step

    policy = nnx.merge(graphdef, state)
    b, plen = rows.prompt_mask_BxQ.shape
    slot_W = jnp.arange(window, dtype=jnp.int32)
    prompt_W = jnp.pad(rows.prompt_mask_BxQ, ((0, 0), (0, max(window - plen, 0))))[:, :window]

    def cond(carry):
        i, _, rows, *_ = carry
        return (i < steps) & ~jnp.all(rows.done_B)

    def body(carry):
        i, cache, rows, key, ids_BxK, logp_BxK = carry
        live_B = ~rows.done_B
        # Done rows still run (their writes land in their own stale slots, which nothing reads).
        slot_B = jnp.minimum(plen + rows.count_B - 1, window - 1)
        valid_BxW = prompt_W | ((slot_W[None] >= plen) & (slot_W[None] <= slot_B[:, None]))
        h_Bx1xD, cache = forward_decode_step(policy, rows.tok_B, rows.pos_B, slot_B, cache, valid_BxW)
        key, sub = jax.random.split(key)
        tok_B, logp_B = sample_tokens(policy_logits(policy, h_Bx1xD)[:, 0], sub, *samp)
        count_B = rows.count_B + live_B
        hit_B = _stop_hit(tok_B, stop_ids) & live_B
        rows = RowState(
            tok_B=jnp.where(live_B, tok_B, rows.tok_B),
            count_B=count_B,
            pos_B=rows.pos_B + live_B,
            done_B=rows.done_B | hit_B | (count_B >= max_new),
            stopped_B=rows.stopped_B | hit_B,
            prompt_mask_BxQ=rows.prompt_mask_BxQ,
        )
        ids_BxK = jax.lax.dynamic_update_slice(ids_BxK, jnp.where(live_B, tok_B, pad_id)[:, None], (0, i))
        logp_BxK = jax.lax.dynamic_update_slice(logp_BxK, jnp.where(live_B, logp_B, 0.0)[:, None], (0, i))
        return i + 1, cache, rows, key, ids_BxK, logp_BxK

    init = (jnp.int32(0), cache, rows, key, jnp.full((b, steps), pad_id, jnp.int32), jnp.zeros((b, steps)))
    _, cache, rows, _, ids_BxK, logp_BxK = jax.lax.while_loop(cond, body, init)
    return cache, rows, ids_BxK, logp_BxK


def _take_rows(cache, rows: RowState, idx_N):
    """Rows idx_N of the cache and row state (compaction into a smaller row bucket)."""
    cache = jax.tree.map(lambda a: a[:, idx_N], cache)
    return cache, jax.tree.map(lambda a: a[idx_N], rows)


class DecodePrograms:
    """The jitted programs of one policy graph; jax caches one compilation per shape / static setting."""

    def __init__(self, graphdef, *, max_new: int, pad_id: int, compiler_options=None):
        self.max_new, self.pad_id = max_new, pad_id
        opts = dict(compiler_options=compiler_options) if compiler_options else {}
        self.prefill = jax.jit(functools.partial(prefill, graphdef, max_new=max_new), donate_argnums=(1, 2), **opts)
        self.chunk = jax.jit(
            functools.partial(decode_chunk, graphdef, max_new=max_new, pad_id=pad_id),
            static_argnames=("steps", "window"),
            donate_argnums=(1, 2),
            **opts,
        )
        self.take = jax.jit(_take_rows, **opts)


def _pow2_at_least(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def window_for(plen: int, longest: int, steps: int, max_new: int) -> int:
    """Cache slots a chunk must see: its longest live row writes slot plen + longest + steps - 2."""
    need = plen + longest + steps - 1
    return min(max(MIN_WINDOW, _pow2_at_least(need)), plen + max_new)


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def run_decode(
    programs: DecodePrograms,
    *,
    state,
    config,
    prompt_PxQ,
    mask_PxQ,
    n,
    rows,
    chunk,
    samp,
    stop_ids,
    key,
    cache_dtype,
    mesh=None,
    place=None,
    shrink=True,
    min_rows=8,
    processes=1,
    rank=0,
    row_align=1,
    on_chunk=None,
):
    """Decodes n samples of each (left-padded) prompt on `rows` device rows with refill and compaction.
    Returns numpy (ids_RxC, logp_RxC, lens_R, stopped_R) in prompt-major order, C = max_new.

    With ``processes`` > 1 every process calls this with its own prompts and decodes them on its own
    block of `rows` rows of one global decode (rows [rank * b, (rank + 1) * b) of every device array,
    which the mesh's data axes put on this process's devices): ``place`` builds the global arrays from
    these local blocks, outputs are read back from this process's shards, and the host decisions that
    fix shapes or the number of device calls (row counts, prefill buckets, compaction, the attention
    window, when to stop) are agreed with one small allgather per round. ``row_align`` (this process's
    data shards) keeps every local block a whole number of shards. One process: exactly the loop it
    always was. ``on_chunk(finished_pairs, total_pairs, tokens)``, if given, is called after every device
    call with this process's counts (a progress bar's hook).
    """
    from conspo_jax.models import init_kv_cache

    max_new, pad_id = programs.max_new, programs.pad_id
    num_prompts, plen = prompt_PxQ.shape
    total = num_prompts * n
    ids_RxC = np.full((total, max_new), pad_id, np.int32)
    logp_RxC = np.zeros((total, max_new), np.float32)
    lens_R = np.zeros((total,), np.int32)
    stopped_R = np.zeros((total,), bool)
    place = place or jnp.asarray

    def agree(*values):  # [processes, len(values)]: every process's values (one process: its own)
        return distributed.allgather_ints(values) if processes > 1 else np.asarray([values])

    def fetch(tree):
        return distributed.to_local(tree) if processes > 1 else jax.device_get(tree)

    b = _round_up(int(agree(rows).max()), row_align)  # this process's rows; every process has as many
    cache = init_kv_cache(config, processes * b, plen + max_new, dtype=cache_dtype, mesh=mesh)
    dev_rows = jax.tree.map(place, empty_rows(b, plen))
    owner_B = np.full((b,), -1, np.int64)  # pair index decoded on each (local) row, -1 when free
    next_pair, calls = 0, 0

    def next_key():
        nonlocal calls
        calls += 1
        return jax.random.fold_in(key, calls)

    def record(r_N, tok_N, logp_N, count_N, done_N, stopped_N):
        for j, r in enumerate(r_N):
            pair = owner_B[r]
            k = count_N[j] - len(tok_N[j])
            ids_RxC[pair, k : count_N[j]] = tok_N[j]
            logp_RxC[pair, k : count_N[j]] = logp_N[j]
            lens_R[pair] = count_N[j]
            if done_N[j]:
                stopped_R[pair] = stopped_N[j]
                owner_B[r] = -1
        if on_chunk is not None:
            on_chunk(next_pair - int(np.count_nonzero(owner_B >= 0)), total, int(lens_R.sum()))

    while True:
        while True:  # refill free rows while any process has pending pairs and free rows
            free = np.flatnonzero(owner_B < 0)
            take = min(free.size, total - next_pair)
            most = int(agree(take).max())
            if most == 0:
                break
            bucket = min(_round_up(_pow2_at_least(max(most, min_rows)), row_align), b)
            # Out-of-range rows (>= every process's rows) are dropped by the scatter.
            idx_N = np.full((bucket,), processes * b, np.int32)
            idx_N[:take] = free[:take] + rank * b
            pairs = np.arange(next_pair, next_pair + take)
            src = np.concatenate([pairs // n, np.full((bucket - take,), pairs[0] // n if take else 0)])
            owner_B[free[:take]] = pairs
            next_pair += take
            cache, dev_rows, tok_N, logp_N = programs.prefill(
                state,
                cache,
                dev_rows,
                place(idx_N),
                place(prompt_PxQ[src]),
                place(mask_PxQ[src]),
                next_key(),
                samp,
                stop_ids,
            )
            tok_N, logp_N, done_B, stopped_B = fetch((tok_N, logp_N, dev_rows.done_B, dev_rows.stopped_B))
            r_N = free[:take]
            record(r_N, tok_N[:take, None], logp_N[:take, None], np.ones(take, np.int64), done_B[r_N], stopped_B[r_N])
        free, live = np.flatnonzero(owner_B < 0), np.flatnonzero(owner_B >= 0)
        longest = int(lens_R[owner_B[live]].max()) if live.size else 0
        g = agree(live.size, longest, int(next_pair < total))
        most_live = int(g[:, 0].max())
        if most_live == 0:
            break
        if shrink and not g[:, 2].any() and most_live <= b // 2 and b > min_rows:
            new_b = _round_up(max(min(_pow2_at_least(most_live), b // 2), min_rows), row_align)
            if new_b < b:
                # At most half the rows are live, so a free (done) row exists to pad with.
                idx = np.concatenate([live, np.full((new_b - live.size,), free[0])]) + rank * b
                cache, dev_rows = programs.take(cache, dev_rows, place(idx.astype(np.int32)))
                # Padding rows duplicate a free (done) row, so they stay done and own nothing.
                owner_B = np.concatenate([owner_B[live], np.full((new_b - live.size,), -1)])
                b = new_b
                continue
        window = window_for(plen, int(g[:, 1].max()), chunk, max_new)
        cache, dev_rows, ids_BxK, logp_BxK = programs.chunk(
            state, cache, dev_rows, next_key(), samp, stop_ids, steps=chunk, window=window
        )
        ids_BxK, logp_BxK, count_B, done_B, stopped_B = fetch(
            (ids_BxK, logp_BxK, dev_rows.count_B, dev_rows.done_B, dev_rows.stopped_B)
        )
        new_B = count_B[live] - lens_R[owner_B[live]]
        toks = [ids_BxK[r, : new_B[j]] for j, r in enumerate(live)]
        logps = [logp_BxK[r, : new_B[j]] for j, r in enumerate(live)]
        record(live, toks, logps, count_B[live], done_B[live], stopped_B[live])
    return ids_RxC, logp_RxC, lens_R, stopped_R
