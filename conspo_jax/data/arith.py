"""A synthetic verifiable task: integer arithmetic whose answer goes in ``\\boxed{}``.

Problems are generated from a seed, so nothing is downloaded. Train and held-out problems are disjoint
by construction (a problem's split is a function of its text), which makes held-out accuracy honest.
The tokenizer is a tiny character-level vocabulary built with the HF ``tokenizers`` library and wrapped
as a ``PreTrainedTokenizerFast``, so the task runs through exactly the code path real checkpoints use.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
BOXED = "\\boxed{"
_SYMBOLS = list("0123456789+-*=?Q:A ") + ["}", BOXED]
_BOX_RE = re.compile(r"\\boxed\{(-?\d+)\}")


def build_arith_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``; ``\\boxed{`` is one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *_SYMBOLS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=PAD,
        clean_up_tokenization_spaces=False,
    )


def _split_of(problem: str, eval_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha1(problem.encode()).digest()[:4], "little") / 2**32
    return "eval" if h < eval_fraction else "train"


def make_arith_records(
    split: str,
    *,
    num: int,
    seed: int = 0,
    max_operand: int = 99,
    ops: str = "+-",
    eval_fraction: float = 0.2,
    pad_operands: bool = False,
) -> list[dict]:
    """``num`` distinct problems of ``split`` ('train' or 'eval') as ``{id, problem, answer}`` records.

    ``pad_operands`` writes operands zero-padded to a common width ("07+12"), aligning digits by
    position, which a tiny transformer learns far faster than ragged numbers.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    capacity = (max_operand + 1) ** 2 * len(ops)
    if num > capacity * (eval_fraction if split == "eval" else 1 - eval_fraction) * 0.9:
        raise ValueError(f"data.num_{split}={num} is too many for max_operand={max_operand}, ops={ops!r}")
    rng = np.random.default_rng(seed)
    records, seen = [], set()
    while len(records) < num:
        a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
        op = ops[int(rng.integers(len(ops)))]
        width = len(str(max_operand)) if pad_operands else 0
        problem = f"{a:0{width}d}{op}{b:0{width}d}" if width else f"{a}{op}{b}"
        if problem in seen or _split_of(problem, eval_fraction) != split:
            continue
        seen.add(problem)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        records.append({"id": f"arith-{split}-{len(records)}", "problem": problem, "answer": str(answer)})
    return records


NL_OPS = {"+": "plus", "-": "minus", "*": "times"}


def make_arith_nl_records(split: str, *, num: int, seed: int = 0, max_operand: int = 99, ops: str = "+-") -> list[dict]:
    """The same problems in words for a chat model ("What is 23 plus 45?"), answers checked by math-verify.

    Splits stay disjoint as in ``make_arith_records`` (a problem's split is a function of its symbolic form).
    """
    out = []
    for r in make_arith_records(split, num=num, seed=seed, max_operand=max_operand, ops=ops):
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", r["problem"]).groups()
        out.append({**r, "id": r["id"].replace("arith", "arith_nl"), "problem": f"What is {a} {NL_OPS[op]} {b}?"})
    return out


def arith_prompt(problem: str) -> str:
    return f"Q:{problem}=? A:"


def arith_target(answer: str) -> str:
    """The supervised completion used by the warm-start phase."""
    return f"{BOXED}{answer}}}"


def arith_extract(response: str) -> str | None:
    """The integer in the last ``\\boxed{n}`` of the response's tail, or None. Never evaluates the text."""
    found = _BOX_RE.findall(response[-256:])
    return found[-1] if found else None


def arith_reward(response: str, answer: str) -> float:
    """1.0 if the last ``\\boxed{n}`` equals the integer answer, else 0.0."""
    got = arith_extract(response)
    return float(got is not None and got == str(answer).strip())
