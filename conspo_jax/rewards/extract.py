"""Answer extraction and the cheap, in-process half of verification.

Everything here is linear-time string work that is safe on any model output, so the parent process
can run it before handing the (bounded) remainder to a math-verify worker:

* ``extract_boxed``: the content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces,
  escaped ``\\{``, and the brace-less ``\\boxed 5`` form).
* ``normalize_answer``: a few rewrites math-verify does not do itself (each one documented below).
* ``quick_verdict``: decides the easy cases (no box, oversized box, identical strings, two plain
  integers) without sympy; everything else needs the worker.
"""

from __future__ import annotations

import re

import numpy as np

# Boxed answers longer than this are not parsed: no benchmark answer comes close (the longest MATH500 /
# OlympiadBench answers are ~150 characters), and sympy's cost grows super-linearly with input size.
MAX_ANSWER_CHARS = 1000


_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)")


def _find_last_box(text: str) -> tuple[int, str] | None:
    """Start index just after the last box command, or None. Skips look-alikes such as ``\\boxedx``.

    One left-to-right regex scan, so linear in ``len(text)`` even for a megabyte of look-alikes (a
    right-to-left ``rfind`` loop per command rescans the prefix for every look-alike: quadratic).
    """
    last = None
    for m in _BOX_COMMAND.finditer(text):
        after = m.end()
        if after >= len(text) or not text[after].isalpha():
            last = m
    return None if last is None else (last.end(), last.group(0))


def _balanced(text: str, open_pos: int) -> str | None:
    """Content of the brace group opening at ``open_pos``; None if it never closes.

    A brace preceded by an odd number of backslashes is escaped (``\\{``) and never changes the
    depth; ``\\\\{`` is an escaped backslash and then a real brace. Vectorised with numpy (a
    Python loop over a megabyte of braces takes ~0.3 s): the depth is a cumulative sum of +1/-1.
    """
    # surrogatepass: a lone surrogate (invalid UTF-16 from a tokenizer) is one code point, not an error.
    codes = np.frombuffer(text[open_pos:].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    backslash = codes == 92
    idx = np.arange(len(codes), dtype=np.int64 if len(codes) >= 2**31 else np.int32)
    # Backslashes in the run ending just before i: i - 1 - (last non-backslash index before i).
    last_plain = np.maximum.accumulate(np.where(backslash, -1, idx))
    run_before = np.empty(len(codes), dtype=idx.dtype)
    run_before[0] = 0
    run_before[1:] = idx[:-1] - last_plain[:-1]
    live = (run_before % 2) == 0
    delta = ((codes == 123) & live).astype(idx.dtype) - ((codes == 125) & live).astype(idx.dtype)
    closed = np.flatnonzero(np.cumsum(delta) == 0)
    return None if closed.size == 0 else text[open_pos + 1 : open_pos + int(closed[0])]


def extract_boxed(text: str) -> str | None:
    """Returns the content of the last ``\\boxed{}`` or ``\\fbox{}`` in ``text``, or None.

    Only the last box counts (a model that boxes several candidates is graded on its final one). A last
    box that never closes (a truncated response) or is empty gives None rather than an earlier box.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_boxed: text must be str, got {type(text).__name__}")
    found = _find_last_box(text)
    if found is None:
        return None
    i, _ = found
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        content = _balanced(text, i)
    else:
        # "\boxed 5$": the argument runs to the next whitespace or math delimiter.
        m = re.match(r"[^\s$]+", text[i:])
        content = m.group(0) if m else None
    if content is None:
        return None
    content = content.strip()
    return content or None


ANSWER_FORMATS = ("boxed", "boxed_or_last_number")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
_TAIL = 256  # the last number is looked for in the response's tail only: linear in nothing long


def extract_answer(text: str, answer_format: str = "boxed") -> str | None:
    """The graded answer of a response: the last box, or with ``boxed_or_last_number`` (GSM8K's usual
    flexible match, for small models that answer correctly but rarely box) the last number of the tail
    when there is no box. Returns None when there is nothing to grade."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    box = extract_boxed(text)
    if box is not None or answer_format == "boxed":
        return box
    found = _NUMBER.findall(text[-_TAIL:])
    return found[-1] if found else None


# --- normalisation -----------------------------------------------------------------------------------
# math-verify already handles \dfrac, \left/\right, units in \text{}, ^\circ, \%, {,} thousands
# separators, x = ... and \text{(C)}. What it gets wrong on its own (checked in tests/test_rewards.py):
#   "1\,000" (thin-space thousands separator) parses as 1*0;   "30°" (unicode degree) is not parsed;
#   "5." (sentence period inside the box) is not parsed;       "\varnothing" is not the empty set;
#   "\$" and "$...$" inside a ground truth confuse the boxed extraction;
#   a bare-word ground truth ("North") parses as a product of symbols N*o*r*t*h, which never equals the
#   model's "\text{north}": a single word of 3+ letters in a ground truth is read as text.
_THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)(?:\\[,;:! ]|~|\\thinspace ?)(?=\d{3}(?!\d))")
_TRAILING_PERIOD = re.compile(r"(?<=[0-9a-zA-Z}])\.\s*$")
_DOLLARS = re.compile(r"(?<!\\)\$")


def normalize_answer(answer: str) -> str:
    """Rewrites an answer string into a form math-verify parses reliably (see the comment above)."""
    s = answer.strip()
    s = s.replace("\\$", "")  # currency sign
    s = _DOLLARS.sub("", s)  # math delimiters, e.g. OlympiadBench "$69$,$84$"
    s = _THIN_SPACE_THOUSANDS.sub("", s)
    s = s.replace("°", "^\\circ").replace("−", "-")
    s = s.replace("\\varnothing", "\\emptyset")
    s = _TRAILING_PERIOD.sub("", s)
    return s.strip()


def ground_truth_answer(ground_truth) -> str:
    """The answer inside a ground truth given as ``5``, ``$5$``, ``\\boxed{5}`` or ``$\\boxed{5}$``."""
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        raise TypeError(f"ground_truth must be str or number, got {type(ground_truth).__name__}: {ground_truth!r}")
    if isinstance(ground_truth, float) and ground_truth.is_integer():
        ground_truth = int(ground_truth)  # AMC files store 27.0
    gt = _int_to_str(ground_truth) if isinstance(ground_truth, int) else str(ground_truth).strip()
    boxed = extract_boxed(gt) if ("\\boxed" in gt or "\\fbox" in gt) else None
    gt = normalize_answer(boxed if boxed is not None else gt)
    return f"\\text{{{gt}}}" if _WORD.match(gt) else gt


_WORD = re.compile(r"^[A-Za-z]{3,}$")


def _int_to_str(n: int) -> str:
    """``str(n)`` for any size: ``str`` itself refuses ints of more than 4300 digits."""
    if n < 0:
        return "-" + _int_to_str(-n)
    chunks = []
    while n >= _CHUNK:
        n, low = divmod(n, _CHUNK)
        chunks.append(str(low).zfill(_CHUNK_DIGITS))
    return str(n) + "".join(reversed(chunks))


_CHUNK_DIGITS = 2000
_CHUNK = 10**_CHUNK_DIGITS


_INT = re.compile(r"^[+-]?(?:\d+|\d{1,3}(?:,\d{3})+)$")
_SPACES = re.compile(r"\s+")


def _plain_int(s: str) -> tuple[bool, str] | None:
    """(negative, digits without leading zeros) of a plain integer, or None.

    Compared as strings rather than converted with ``int``: Python refuses to convert more than 4300
    digits (``sys.get_int_max_str_digits``), and a 5000-digit answer must be scored, not raised.
    """
    if not _INT.match(s):
        return None
    digits = s.lstrip("+-").replace(",", "").lstrip("0") or "0"
    return s.startswith("-") and digits != "0", digits


# Verdict reasons. "parsed" ones come from math-verify; the others are decided here or by the pool.
NO_BOX = "no_box"
TOO_LONG = "too_long"
EXACT = "exact"
INTEGER = "integer"
TEXT = "text"
PARSED = "parsed"
TIMEOUT = "timeout"
ERROR = "error"


_TEXT_WORD = re.compile(r"^(?:\\(?:text|textbf|mathrm|mbox)\{\s*([A-Za-z]+)\s*\}|([A-Za-z]+))$")


def _word(s: str) -> str | None:
    m = _TEXT_WORD.match(s.strip())
    return (m.group(1) or m.group(2)).lower() if m else None


def quick_verdict(pred: str, gold: str) -> tuple[float, str] | None:
    """Scores the cases that need no sympy: (score, reason), or None when math-verify must decide.

    ``pred`` and ``gold`` are already normalised. Identical strings (ignoring whitespace) are equal; two
    plain integers compare by value ("023" is 23, "24" is never 23); two single words, bare or in
    ``\\text{}``, compare case-insensitively as math-verify does ("East" is "\\text{east}").
    """
    if _SPACES.sub("", pred) == _SPACES.sub("", gold):
        return 1.0, EXACT
    a, b = _plain_int(pred), _plain_int(gold)
    if a is not None and b is not None:
        return float(a == b), INTEGER
    wa, wb = _word(pred), _word(gold)
    if wa is not None and wb is not None and len(wb) >= 3:
        return float(wa == wb), TEXT
    return None
