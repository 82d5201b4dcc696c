"""Math benchmark and training-set loaders; every set comes out as ``{id, problem, answer}`` records.

``load_benchmark(name)`` knows the files of the paper's benchmarks and training sets by name (see
``BENCHMARKS``) under a data directory (``$CONSPO_DATA_DIR``, else ``<repo>/../shared/data``).
``load_records(path)`` reads any local jsonl / json / parquet / csv file and finds the problem and
answer fields itself (or is told them; the files themselves are read by ``conspo_jax.data.files``). ``load_hf``
goes through ``datasets`` when it is installed.

Normalisation: ids are strings, answers are strings ("27" for AMC's 27.0, the text after ``####`` for
GSM8K, the last ``\\boxed{}`` of the solution when a set has no answer field), and problems lose any
instruction their source appended (HMMT's "Please reason step by step...", DAPO's "Answer: $Answer"
wrapper), since our own prompt adds the paper's instruction.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from conspo_jax.data.files import FORMATS, DataError, MissingAnswerError, default_data_dir, read_rows
from conspo_jax.rewards.extract import extract_boxed

log = logging.getLogger(__name__)


# --- field normalisation -----------------------------------------------------------------------------

# (marker substring, pattern): the cheap substring test keeps 17k-row sets fast.
_TRAILING_INSTRUCTIONS = [
    (
        "Please reason step by step",
        re.compile(r"\s*Please reason step by step, and put your final answer within \\boxed\{\}\.?\s*$"),
    ),
    (
        "Let's think step by step",
        re.compile(r"\s*Let's think step by step and output the final answer within \\boxed\{\}\.?\s*$"),
    ),
    (
        "Remember to put your answer",
        re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$"),
    ),
]
_DAPO_PREFIX = re.compile(
    r"^\s*Solve the following math problem step by step\..*?where \$Answer is the answer to the problem\.\s*", re.S
)


def clean_problem(text: str) -> str:
    """Removes instruction wrappers that sources add around the problem statement."""
    if "Solve the following math problem" in text:
        text = _DAPO_PREFIX.sub("", text)
    for marker, pattern in _TRAILING_INSTRUCTIONS:
        if marker in text:
            text = pattern.sub("", text)
    return text.strip()


def _prompt_text(prompt: Any) -> str:
    """A ``prompt`` field that is a string or a chat message list (verl / DAPO parquet format)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt:
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role", "user") == "user"]
        if users:
            return users[-1]
    raise ValueError(f"cannot read a problem from prompt={prompt!r:.120}")


def answer_string(answer: Any) -> str:
    """Answers as strings: 27.0 -> "27", ["$69$,$84$"] -> "$69$,$84$", "['9.6\\n']" -> "9.6"."""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    if isinstance(answer, (list, tuple)):
        return ", ".join(answer_string(a) for a in answer)
    if isinstance(answer, str):
        s = answer.strip()
        if s.startswith("['") or s.startswith('["'):  # a python list stored as text (DeepScaleR eval copies)
            try:
                items = ast.literal_eval(s)  # literals only: never executes anything
            except (ValueError, SyntaxError):
                items = None
            if isinstance(items, list) and all(isinstance(x, str) for x in items):
                return ", ".join(x.strip() for x in items)
        return s
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    raise ValueError(f"unsupported answer value {answer!r:.80} ({type(answer).__name__})")


_PROBLEM_FIELDS = ("problem", "question", "prompt")
_ANSWER_FIELDS = ("answer", "final_answer", "ground_truth", "reward_model.ground_truth", "solution")
_ID_FIELDS = ("id", "unique_id", "idx", "extra_info.index")


def _get(row: dict, dotted: str):
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _first(row: dict, fields) -> tuple[str | None, Any]:
    for f in fields:
        v = _get(row, f)
        if v is not None and v != "":
            return f, v
    return None, None


def normalize_row(
    row: dict,
    index: int,
    *,
    source: str,
    problem_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
) -> dict:
    """One raw row as ``{id, problem, answer}``; a missing field raises naming the file and row."""
    pf, problem = (problem_field, _get(row, problem_field)) if problem_field else _first(row, _PROBLEM_FIELDS)
    if problem is None:
        raise DataError(
            f"{source} row {index}: no problem field (tried {problem_field or _PROBLEM_FIELDS}); keys are {sorted(row)}"
        )
    if pf == "prompt" or not isinstance(problem, str):
        try:
            problem = _prompt_text(problem)
        except ValueError as e:
            raise DataError(f"{source} row {index}: field {pf!r}: {e}") from None
    if _get(row, "extra_info.raw_problem"):  # DAPO eval parquet keeps the unwrapped problem
        problem = _get(row, "extra_info.raw_problem")
    af, answer = (answer_field, _get(row, answer_field)) if answer_field else _first(row, _ANSWER_FIELDS)
    if answer is None:
        raise MissingAnswerError(
            f"{source} row {index}: no answer field (tried {answer_field or _ANSWER_FIELDS}); keys are {sorted(row)}"
        )
    if af == "solution":  # no answer field: the answer is the solution's last box (Minerva)
        text = answer if isinstance(answer, str) else "\n".join(map(str, answer))
        answer = extract_boxed(text)
        if answer is None:
            raise MissingAnswerError(f"{source} row {index}: solution has no \\boxed{{}} answer")
    _, rid = (id_field, _get(row, id_field)) if id_field else _first(row, _ID_FIELDS)
    try:
        answer = answer_string(answer)
    except ValueError as e:
        raise DataError(f"{source} row {index}: field {af!r}: {e}") from None
    return {"id": str(index if rid is None else rid), "problem": clean_problem(str(problem)), "answer": answer}


def load_records(
    path: str,
    format: str | None = None,
    *,
    problem_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Reads any local file as ``{id, problem, answer}`` records (fields found automatically, or named
    with dotted paths such as ``reward_model.ground_truth``)."""
    rows = read_rows(path, format)
    if limit is not None:
        rows = rows[: int(limit)]
    return [
        normalize_row(r, i, source=path, problem_field=problem_field, answer_field=answer_field, id_field=id_field)
        for i, r in enumerate(rows)
    ]


# --- per-set fixes and the registry ------------------------------------------------------------------


def _gsm8k(row: dict, i: int, source: str) -> dict:
    sol = row.get("answer")
    if not isinstance(sol, str) or "####" not in sol:
        raise DataError(f"{source} row {i}: GSM8K answer has no '####' final answer: {sol!r:.80}")
    if not isinstance(row.get("question"), str):
        raise DataError(f"{source} row {i}: no 'question' field; keys are {sorted(row)}")
    final = sol.rsplit("####", 1)[1].strip().replace(",", "")
    return {"id": str(i), "problem": row["question"].strip(), "answer": final}


def _olympiad(row: dict, i: int, source: str) -> dict:
    rec = normalize_row(row, i, source=source, problem_field="question", answer_field="final_answer")
    if row.get("context"):  # the problem's shared preamble, when a row has one
        rec["problem"] = f"{str(row['context']).strip()}\n\n{rec['problem']}"
    return rec


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """Where a named set lives under the data dir and how its rows become records."""

    files: tuple[str, ...]
    metric_k: int = 1  # avg@k in the paper's protocol: 32 for AIME / HMMT / AMC, else pass@1
    row_fn: Callable[[dict, int, str], dict] | None = None
    column: str | None = None  # the paper-table column it fills
    description: str = ""
    skip_unanswered: bool = False  # training sets drop rows without an answer (logged) instead of failing
    keep: Callable[[dict], bool] | None = None  # a subset: raw rows it rejects are left out (ids keep row numbers)


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec(("math500/test.jsonl",), 1, column="MATH500", description="MATH500 (500)"),
    "aime24": BenchmarkSpec(("aime24/test.jsonl",), 32, column="AIME24", description="AIME 2024 (30)"),
    "aime25": BenchmarkSpec(("aime25/test.jsonl",), 32, column="AIME25", description="AIME 2025 (30)"),
    "aime26": BenchmarkSpec(("aime26/test.jsonl",), 32, column="AIME26", description="AIME 2026 I+II (30)"),
    "hmmt25": BenchmarkSpec(("hmmt_feb_2025/hmmt25.jsonl",), 32, column="HMMT25", description="HMMT Feb 2025 (30)"),
    "amc": BenchmarkSpec(
        ("amc23/deepscaler_amc.json",), 32, column="AMC", description="AMC 12 2022+2023, DeepScaleR's eval set (83)"
    ),
    "amc23": BenchmarkSpec(("amc23/test.jsonl",), 32, column="AMC", description="AMC 12 2023 (40)"),
    "olympiadbench": BenchmarkSpec(
        ("olympiadbench/test.jsonl",),
        1,
        _olympiad,
        column="O-Bench",
        description="OlympiadBench math, English, open-ended (675)",
    ),
    "math500_l12": BenchmarkSpec(
        ("math500/test.jsonl",),
        1,
        keep=lambda row: row.get("level") in (1, 2, "1", "2", "Level 1", "Level 2"),
        column="MATH500 L1-2",
        description="MATH500 levels 1-2 (a subset a small model partly solves)",
    ),
    "minerva": BenchmarkSpec(("minerva_math/test.jsonl",), 1, column="Minerva", description="Minerva OCW (272)"),
    "gsm8k": BenchmarkSpec(("gsm8k/test.jsonl",), 1, _gsm8k, column="GSM8K", description="GSM8K test (1319)"),
    # training sets
    "gsm8k_train": BenchmarkSpec(("gsm8k/train.jsonl",), row_fn=_gsm8k, description="GSM8K train (7473)"),
    "dapo_math_17k": BenchmarkSpec(
        ("dapo_math_17k/dapo_math_17k.parquet",), description="DAPO-Math-17k (17917)", skip_unanswered=True
    ),
    "deepscaler": BenchmarkSpec(
        ("deepscaler_train_partial/aime.json", "deepscaler_train_partial/math.json"),
        description="DeepScaleR-Preview, the AIME+MATH part only (975+7470)",
        skip_unanswered=True,
    ),
    "deepscaler_aime": BenchmarkSpec(
        ("deepscaler_train_partial/aime.json",), description="AIME 1983-2023 (975)", skip_unanswered=True
    ),
    "deepscaler_math": BenchmarkSpec(
        ("deepscaler_train_partial/math.json",),
        skip_unanswered=True,
        description="MATH train (7474 rows, 4 without an answer are skipped)",
    ),
}
ALIASES = {
    "olympiad": "olympiadbench",
    "o-bench": "olympiadbench",
    "minerva_math": "minerva",
    "hmmt": "hmmt25",
    "hmmt_feb_2025": "hmmt25",
    "dapo": "dapo_math_17k",
    "math": "math500",
}


def benchmark_spec(name: str) -> BenchmarkSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise DataError(
            f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)}; or a file path, or 'hf:<dataset>[:split]')"
        )
    return BENCHMARKS[key]


def canonical_name(name: str) -> str:
    """The registry key of ``name`` ("O-Bench" -> "olympiadbench"); other names (paths) unchanged."""
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in BENCHMARKS else name


def load_benchmark(name: str, data_dir: str | None = None, *, limit: int | None = None) -> list[dict]:
    """Records of a named set (``BENCHMARKS``), a local file path, or ``hf:<dataset>[:split]``.

    Ids are prefixed with the file's stem when a set spans several files, so they stay unique.
    """
    if name.startswith("hf:"):
        path, _, split = name[3:].partition(":")
        return load_hf(path, split=split or "test", limit=limit)
    if os.path.isfile(name) and name.lower() not in BENCHMARKS:
        return load_records(name, limit=limit)
    spec = benchmark_spec(name)
    root = data_dir or default_data_dir()
    records: list[dict] = []
    skipped = 0
    for rel in spec.files:
        path = os.path.join(root, rel)
        for i, row in enumerate(read_rows(path)):
            if limit is not None and len(records) >= limit:
                break
            if spec.keep is not None and not spec.keep(row):
                continue
            try:
                rec = spec.row_fn(row, i, path) if spec.row_fn else normalize_row(row, i, source=path)
            except MissingAnswerError:
                if not spec.skip_unanswered:
                    raise
                skipped += 1
                continue
            if len(spec.files) > 1:
                rec["id"] = f"{os.path.splitext(os.path.basename(rel))[0]}/{rec['id']}"
            records.append(rec)
    if skipped:
        log.warning("%s: skipped %d rows without an answer", name, skipped)
    return records


def load_hf(
    path: str,
    *,
    split: str = "test",
    name: str | None = None,
    problem_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """A Hugging Face hub dataset as records, through ``datasets`` (not a dependency of this package)."""
    try:
        import datasets  # noqa: PLC0415 - optional
    except ImportError as e:
        raise ImportError(
            f"load_hf({path!r}) needs the 'datasets' package (pip install datasets); without "
            "it, download the file and use load_records(path)"
        ) from e
    ds = datasets.load_dataset(path, name, split=split)
    rows = list(ds.select(range(min(limit, len(ds))))) if limit is not None else list(ds)
    return [
        normalize_row(dict(r), i, source=f"hf:{path}:{split}", problem_field=problem_field, answer_field=answer_field)
        for i, r in enumerate(rows)
    ]


def load_dataset_spec(
    spec: str, *, fmt: str | None = None, data_dir: str | None = None, limit: int | None = None
) -> list[dict]:
    """What a config's ``data.train`` names: a registry name, a local file (``fmt`` forces its format),
    or ``hf:<dataset>[:split]``. One clear error for anything else."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"dataset spec must be a non-empty string, got {spec!r}")
    if os.path.isfile(spec):
        return load_records(spec, fmt, limit=limit)
    if spec.startswith("hf:") or canonical_name(spec) in BENCHMARKS:
        return load_benchmark(spec, data_dir, limit=limit)
    if os.path.sep in spec or os.path.splitext(spec)[1].lower() in FORMATS:
        raise DataError(f"no such data file: {spec!r}")
    raise DataError(
        f"dataset {spec!r} is neither a known name ({', '.join(BENCHMARKS)}), an existing file, "
        "nor 'hf:<dataset>[:split]'"
    )
