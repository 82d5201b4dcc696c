"""Benchmark evaluation in the paper's protocol (Section 5.1, Appendix B): avg@32 on AIME, HMMT and AMC,
pass@1 elsewhere, temperature 0.6, top-p 0.95, the training response length.

``evaluate`` drives any ``RolloutEngine`` (the JAX sampler, the sidecar client, SGLang, the mock): it
encodes each problem with the paper's prompt, samples k completions per problem in chunks, verifies
them in the reward pool while the engine samples the next chunk, and writes ``results.json``,
``table.md`` and ``samples.jsonl`` (every sample with its extracted answer and verdict) to ``out_dir``.

With several processes (``conspo_jax.base.distributed``) every engine call's prompts are split into one
contiguous slice per process, each process samples (one global decode) and verifies its slice, the
verdicts are gathered, and process 0 writes the files: the scores are those of one process.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from conspo_jax.base import distributed
from conspo_jax.data import math_data
from conspo_jax.data.prompts import encode_prompt
from conspo_jax.evals import metrics, report
from conspo_jax.rewards import RewardPool, extract_boxed
from conspo_jax.rollout.engine import FINISH_LENGTH, SamplingParams

DEFAULT_BENCHMARKS = ("aime24", "aime25", "aime26", "hmmt25", "math500", "amc", "olympiadbench")


def _eos_ids(tokenizer) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return tuple(int(t) for t in eos if t is not None)


def _resolve(benchmarks, data_dir, limit) -> list[tuple[str, list[dict]]]:
    if isinstance(benchmarks, str):
        benchmarks = [b for b in benchmarks.split(",") if b]
    if isinstance(benchmarks, Mapping):
        items = [(name, list(recs)[:limit] if limit else list(recs)) for name, recs in benchmarks.items()]
    else:
        items = [(math_data.canonical_name(b), math_data.load_benchmark(b, data_dir, limit=limit)) for b in benchmarks]
    if not items:
        raise ValueError("evaluate: no benchmarks given")
    for name, recs in items:
        if not recs:
            raise ValueError(f"evaluate: benchmark {name!r} has no problems")
    return items


def _k_for(name: str, k_overrides) -> int:
    if isinstance(k_overrides, int):
        k = k_overrides
    elif k_overrides and name in k_overrides:
        k = int(k_overrides[name])
    else:
        k = math_data.BENCHMARKS[name].metric_k if name in math_data.BENCHMARKS else 1
    if k < 1:
        raise ValueError(f"evaluate: k for {name!r} must be >= 1, got {k}")
    return k


def _column(name: str, taken: set) -> str:
    col = math_data.BENCHMARKS[name].column if name in math_data.BENCHMARKS else None
    col = col or name
    return col if col not in taken else name  # e.g. 'amc' and 'amc23' both run: the second keeps its name


def evaluate(
    engine,
    tokenizer,
    benchmarks,
    *,
    out_dir: str,
    max_new_tokens: int,
    k_overrides: Mapping[str, int] | int | None = None,
    temperature: float = 0.6,
    top_p: float = 0.95,
    seed: int = 0,
    data_dir: str | None = None,
    limit: int | None = None,
    label: str = "model",
    pool: RewardPool | None = None,
    rows_per_call: int = 256,
    stop_token_ids: Sequence[int] | None = None,
    progress: bool = True,
    encode: Callable[[dict], list] | None = None,
    verify: Callable[[list, list], list] | None = None,
    chunk_seed: Callable[[str, int], int] | None = None,
) -> dict:
    """Evaluates ``engine`` on ``benchmarks`` and returns the results dict (also written to out_dir).

    benchmarks:    names ("aime24", ...; see ``conspo_jax.data.math_data.BENCHMARKS``), file paths, or a
                   mapping {name: records}.
    k_overrides:   samples per problem, {name: k} or one int for all (default: the paper's 32 or 1).
    limit:         only the first ``limit`` problems of each benchmark (smoke tests).
    rows_per_call: completions per engine call (prompts per call = max(1, rows_per_call // k)); the
                   last chunk is padded with repeats so a compiled sampler sees one shape.
    pool:          a ``RewardPool`` to verify with (default: a private one, closed at the end).
    encode:        record -> prompt token ids (default: the paper's math prompt, ``encode_prompt``).
    verify:        (texts, answers) -> one ``Verdict`` each (default: ``pool.verify``, math-verify).
                   A training task passes its own ``encode`` / ``verify`` (``conspo_jax.run.build.Task``).
    chunk_seed:    (benchmark, first problem index) -> the sampling seed of that engine call
                   (default: a hash of ``seed``, the benchmark name and the index).
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise ValueError(f"evaluate: max_new_tokens must be >= 1, got {max_new_tokens}")
    items = _resolve(benchmarks, data_dir, limit)
    stop = tuple(stop_token_ids) if stop_token_ids is not None else _eos_ids(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    encode = encode or (lambda rec: encode_prompt(rec["problem"], tokenizer))
    chunk_seed = chunk_seed or (lambda name, start: (seed * 1_000_003 + zlib.crc32(name.encode()) + start) % 2**31)
    own_pool = verify is None and pool is None
    pool = pool or (RewardPool() if own_pool else None)
    verify = verify or pool.verify
    verifier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="conspo-verify")
    results: dict = {
        "label": label,
        "settings": dict(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            limit=limit,
            stop_token_ids=list(stop),
        ),
        "benchmarks": {},
    }
    columns: set = set()
    t_all = time.time()
    try:
        samples_path = os.path.join(out_dir, "samples.jsonl") if distributed.is_primary() else os.devnull
        with open(samples_path, "w", encoding="utf-8") as samples_f:
            for name, records in items:
                k = _k_for(name, k_overrides)
                col = _column(name, columns)
                columns.add(col)
                res = _run_benchmark(
                    engine,
                    tokenizer,
                    name,
                    records,
                    k=k,
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    stop=stop,
                    encode=encode,
                    verify=verify,
                    chunk_seed=chunk_seed,
                    verifier=verifier,
                    rows_per_call=rows_per_call,
                    samples_f=samples_f,
                    bar=tqdm(
                        total=len(records),
                        desc=f"{name} ({'avg' if k > 1 else 'pass'}@{k})",
                        unit="problem",
                        disable=not progress,
                    ),
                )
                res["column"] = col
                results["benchmarks"][name] = res
    finally:
        verifier.shutdown(wait=True)
        if own_pool:
            pool.close()
    scores = [b["score"] for b in results["benchmarks"].values()]
    results["average"] = float(np.mean(scores))
    results["seconds"] = round(time.time() - t_all, 2)
    results["table"] = report.table_from_results(results, label)
    if distributed.is_primary():
        report.write_results(out_dir, results)
    return results


def _run_benchmark(
    engine,
    tokenizer,
    name,
    records,
    *,
    k,
    temperature,
    top_p,
    max_new_tokens,
    stop,
    encode,
    verify,
    chunk_seed,
    verifier,
    rows_per_call,
    samples_f,
    bar,
) -> dict:
    t0 = time.time()
    prompts = [encode(r) for r in records]
    per_call = max(1, rows_per_call // k)
    procs, rank = distributed.process_count(), distributed.process_index()
    correct = np.zeros((len(records), k), bool)
    stats = {"truncated": 0, "no_box": 0, "timeouts": 0, "tokens": 0}
    pending = None

    def finish(job):
        start, chunk_recs, texts, lens, reasons, verdicts_future = job
        verdicts = verdicts_future.result()
        if distributed.multi_process():  # every process's slice, in process (= prompt) order
            parts = distributed.allgather((texts, list(lens), reasons, verdicts))
            texts, lens, reasons, verdicts = ([x for part in parts for x in part[i]] for i in range(4))
        for row, (text, v) in enumerate(zip(texts, verdicts)):
            p, s = divmod(row, k)
            correct[start + p, s] = v.score > 0
            stats["truncated"] += reasons[row] == FINISH_LENGTH
            # counted from the text: a task that grades unboxed answers too still reports its boxed rate
            stats["no_box"] += extract_boxed(text) is None
            stats["timeouts"] += v.reason == "timeout"
            stats["tokens"] += int(lens[row])
            rec = chunk_recs[p]
            samples_f.write(
                json.dumps(
                    {
                        "benchmark": name,
                        "id": rec["id"],
                        "sample": s,
                        "answer": rec["answer"],
                        "extracted": v.extracted,
                        "correct": bool(v.score > 0),
                        "verdict": v.reason,
                        "finish_reason": reasons[row],
                        "num_tokens": int(lens[row]),
                        "response": text,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
        bar.update(len(chunk_recs))
        done = start + len(chunk_recs)
        bar.set_postfix(score=f"{100 * correct[:done].mean():.1f}")

    try:
        for start in range(0, len(records), per_call):
            chunk = prompts[start : start + per_call]
            real = len(chunk)
            if real < per_call and len(records) > per_call:
                chunk = chunk + [chunk[-1]] * (per_call - real)  # same shape as the other calls
            chunk = chunk + [chunk[-1]] * (-len(chunk) % procs)  # an equal slice for every process
            per_proc = len(chunk) // procs
            first = rank * per_proc  # this process's slice: chunk[first : first + per_proc]
            params = SamplingParams(
                n=k,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                stop_token_ids=stop,
                seed=chunk_seed(name, start),
            )
            out = engine.generate(chunk[first : first + per_proc], params)
            rows = min(max(real - first, 0), per_proc) * k  # this process's rows of real problems
            texts = tokenizer.batch_decode(out.completions()[:rows], skip_special_tokens=True)
            lens = out.completion_lens_R[:rows]
            reasons = list(out.finish_reasons[:rows])
            answers = [records[start + first + r // k]["answer"] for r in range(rows)]
            job = (
                start,
                records[start : start + real],
                texts,
                lens,
                reasons,
                verifier.submit(verify, texts, answers),
            )
            if pending is not None:
                finish(pending)  # verify chunk i while the engine samples chunk i + 1
            pending = job
        if pending is not None:
            finish(pending)
    finally:
        bar.close()
    n_samples = correct.size
    return {
        "metric": f"avg@{k}" if k > 1 else "pass@1",
        "score": 100.0 * metrics.avg_at_k(correct),
        "k": k,
        "num_problems": len(records),
        "num_samples": n_samples,
        "pass_at_k": {str(kk): 100.0 * metrics.mean_pass_at_k(correct, kk) for kk in metrics.report_ks(k)},
        "truncated_frac": stats["truncated"] / n_samples,
        "no_box_frac": stats["no_box"] / n_samples,
        "verifier_timeouts": stats["timeouts"],
        "mean_response_tokens": stats["tokens"] / n_samples,
        "seconds": round(time.time() - t0, 2),
    }
