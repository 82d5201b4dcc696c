"""Facts about a compiled XLA program read from its HLO text (or StableHLO): ``hlo_facts``.

`hlo_facts` answers what the profiling summary asks of a program: is cuDNN fused attention used, which
matmuls run in f32 (and whether one has a [tokens x vocab] side), how often the KV cache is copied,
and how many matmul FLOPs run per execution, each while-loop body counted as often as its known trip
count (XLA's own `cost_analysis()` counts a loop body once). It parses the text XLA prints for
`compiled.as_text()`: computations, instructions with their result shapes, and the call graph.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["hlo_facts"]

_SHAPE_RE = re.compile(r"^([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALL_ATTRS = ("calls", "to_apply", "body", "condition", "branch_computations", "called_computations")


def _split_type(rest: str) -> tuple[str, str]:
    """'f32[2,3]{1,0} dot(...)' -> ('f32[2,3]{1,0}', 'dot(...)'); tuple types '(…)' kept whole."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _first_shape(type_str: str) -> tuple[str, tuple[int, ...]] | None:
    m = _SHAPE_RE.match(type_str.lstrip("("))
    if not m:
        return None
    return m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)


def _operands(op_and_args: str) -> tuple[str, list[str], str]:
    """'dot(%a, %b), lhs_contracting_dims={1}' -> ('dot', ['a', 'b'], 'lhs_contracting_dims={1}')."""
    opcode, _, tail = op_and_args.partition("(")
    depth, i = 1, 0
    while i < len(tail) and depth:
        depth += tail[i] == "("
        depth -= tail[i] == ")"
        i += 1
    args, attrs = tail[: i - 1], tail[i:]
    # Operands are '%name' (newer XLA) or 'f32[2,3]{1,0} %name' (older): keep the inline type if given.
    tokens = [tok.strip() for tok in _split_top(args) if tok.strip()]
    return opcode.strip(), [t if _SHAPE_RE.match(t) else t.split()[-1].lstrip("%") for t in tokens], attrs


def _split_top(s: str) -> list[str]:
    out, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(s[start:i])
            start = i + 1
    out.append(s[start:])
    return out


def _parse_hlo(text: str):
    """Computations of an HLO module: {comp: [instr]}, shapes {name: (dtype, dims)}, entry name."""
    comps: dict[str, list[dict]] = {}
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    entry, current = None, None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None or (not line.startswith(" ") and stripped.endswith("{")):
            m = _COMP_RE.match(stripped)
            if m:
                current = m.group(1)
                comps[current] = []
                if stripped.startswith("ENTRY"):
                    entry = current
            continue
        if stripped == "}":
            current = None
            continue
        m = _INSTR_RE.match(line)
        if not m:
            continue
        name, rest = m.groups()
        type_str, op_and_args = _split_type(rest)
        opcode, operands, attrs = _operands(op_and_args)
        shape = _first_shape(type_str)
        if shape is not None:
            shapes[name] = shape
        comps[current].append(
            dict(name=name, type=type_str, shape=shape, opcode=opcode, operands=operands, attrs=attrs)
        )
    return comps, shapes, entry


def _operand_shape(op: str, shapes) -> tuple[str, tuple[int, ...]] | None:
    return _first_shape(op) if _SHAPE_RE.match(op) else shapes.get(op)


def _callees(instr) -> list[tuple[str, int | None]]:
    """(computation, times per execution of instr) for every computation instr calls."""
    out = []
    trip = None
    if instr["opcode"] == "while":
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instr["attrs"])
        trip = int(m.group(1)) if m else None
    for attr in _CALL_ATTRS:
        for m in re.finditer(rf"\b{attr}=\{{?([^}},]+(?:,\s*%[\w.\-]+)*)\}}?", instr["attrs"]):
            for callee in m.group(1).split(","):
                callee = callee.strip().lstrip("%")
                out.append((callee, trip if attr in ("body", "condition") else 1))
    return out


def _multiplicities(comps, entry, *, trip_counts: bool = True) -> tuple[dict[str, int], int]:
    """How many times each computation runs per program execution (unknown trip counts count as 1;
    with trip_counts=False every loop body counts once, as XLA's cost_analysis() does)."""
    mult = {c: 0 for c in comps}
    unknown = 0
    order: list[str] = []
    seen: set[str] = set()

    def visit(c):  # post-order over the (acyclic) call graph
        if c in seen or c not in comps:
            return
        seen.add(c)
        for instr in comps[c]:
            for callee, _ in _callees(instr):
                visit(callee)
        order.append(c)

    visit(entry)
    mult[entry] = 1
    for c in reversed(order):
        for instr in comps[c]:
            for callee, times in _callees(instr):
                if callee in mult:
                    if times is None:
                        unknown += 1
                    mult[callee] += mult[c] * (1 if times is None or not trip_counts else times)
    return mult, unknown


def _dims(attrs: str, key: str) -> tuple[int, ...]:
    m = re.search(rf"\b{key}=\{{([0-9,]*)\}}", attrs)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def _gemm_contracting(attrs: str) -> tuple[int, ...]:
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attrs)
    return tuple(int(d.strip('" ')) for d in m.group(1).split(",") if d.strip('" ')) if m else ()


def _is_cudnn_attention(target: str) -> bool:
    t = target.lower()
    return "cudnn" in t and ("fmha" in t or "attention" in t)


def _fmt(shape) -> str:
    return f"{shape[0]}[{','.join(map(str, shape[1]))}]" if shape else "?"


def _num_partitions(text: str) -> int:
    """Devices one SPMD program runs on ('num_partitions=8' in the HloModule line, or the StableHLO
    module's mhlo.num_partitions); 1 when absent."""
    header = text.lstrip().split("\n", 1)[0]  # the HloModule / module line
    m = re.search(r"\bnum_partitions\s*=\s*(\d+)", header)
    return int(m.group(1)) if m else 1


def _stablehlo_facts(text: str, vocab_size: int | None) -> dict[str, Any]:
    """The matmul facts of a StableHLO module (dtypes before XLA's optimisations; no trip counts)."""
    dots, targets = [], set()
    for m in re.finditer(r"stablehlo\.dot(?:_general)?\b[^\n]*?:\s*\(([^\n]*?)\)\s*->\s*(tensor<[^>]*>)", text):
        operands = [_tensor_shape(t) for t in re.findall(r"tensor<[^>]*>", m.group(1))]
        dots.append(dict(operands=operands, result=_tensor_shape(m.group(2))))
    for m in re.finditer(r"stablehlo\.custom_call\s+@([\w$.\-]+)|call_target_name\s*=\s*\"([^\"]+)\"", text):
        targets.add(m.group(1) or m.group(2))
    return _dot_summary(dots, vocab_size) | dict(
        format="stablehlo",
        num_partitions=_num_partitions(text),
        cudnn_attention=any(_is_cudnn_attention(t) for t in targets),
        custom_call_targets=sorted(targets),
        kv_cache_copies=0,
        dot_flops=None,
        dot_flops_loops_once=None,
        fused_attention_flops=None,
        executed_flops=None,
        unknown_trip_counts=None,
    )


def _tensor_shape(t: str) -> tuple[str, tuple[int, ...]]:
    parts = t[len("tensor<") : -1].split("x")
    return parts[-1], tuple(int(p) for p in parts[:-1])


def _dot_summary(dots: list[dict], vocab_size: int | None) -> dict[str, Any]:
    f32 = [d for d in dots if any(s and s[0] in ("f32", "f64") for s in d["operands"])]

    def vocab_sided(d) -> bool:
        shapes = [*d["operands"], d["result"]]
        return any(s and vocab_size in s[1] and math.prod(s[1]) > vocab_size for s in shapes)

    f32_vocab = [d for d in f32 if vocab_size and vocab_sided(d)]
    describe = lambda d: " x ".join(_fmt(s) for s in d["operands"]) + " -> " + _fmt(d["result"])  # noqa: E731
    return dict(
        num_dots=len(dots),
        num_f32_dots=len(f32),
        f32_dot_shapes=[describe(d) for d in f32],
        num_f32_vocab_dots=len(f32_vocab) if vocab_size else None,
        f32_vocab_dot_shapes=[describe(d) for d in f32_vocab],
    )


def hlo_facts(
    hlo_text: str, *, vocab_size: int | None = None, kv_cache_shapes: Sequence[Sequence[int]] = ()
) -> dict[str, Any]:
    """Facts about an optimised HLO module (`compiled.as_text()`); StableHLO text is accepted too.

    - num_partitions: devices the (SPMD-partitioned) program runs on. Every count below is of the
      per-device program; multiply FLOPs by num_partitions for the whole mesh's.
    - cudnn_attention: a custom call whose target names cuDNN and fmha/attention is present.
    - num_dots, num_f32_dots, f32_dot_shapes: matmuls (dot ops and cuBLAS gemm custom calls) in the
      program text, and those with an f32 operand (they run at the fp32 rate). A dot inside a loop
      body appears once, however many times the loop runs.
    - num_f32_vocab_dots, f32_vocab_dot_shapes (given vocab_size): f32 matmuls with an operand or
      result that has a vocab-sized dimension besides others, e.g. a [tokens x V] logits cotangent.
    - kv_cache_copies: copy ops whose shape equals one of kv_cache_shapes (per program execution,
      loop trip counts applied: a decode-step program should have none).
    - dot_flops: 2 * M * N * K summed over every matmul, times how often its computation runs (known
      while-loop trip counts applied; unknown_trip_counts says how many loops had none and counted 1).
      dot_flops_loops_once: the same with every loop body counted once (comparable to XLA's
      cost_analysis() 'flops', which counts loops that way).
    - fused_attention_flops: an estimate for cuDNN attention calls, whose matmuls are no dots: forward
      2 matmuls (QK^T, PV) of 2 * |q| * S FLOPs, backward 5 (QK^T recomputed, dV, dP, dQ, dK), halved
      when the call's mask is causal; S is the key length (from bmm1's dimension numbers, else k's
      dim 1, the BTNH layout). Included in executed_flops = dot_flops + fused_attention_flops.
    """
    if "stablehlo." in hlo_text or "func.func" in hlo_text:
        return _stablehlo_facts(hlo_text, vocab_size)
    comps, shapes, entry = _parse_hlo(hlo_text)
    if entry is None:
        raise ValueError("hlo_facts hlo_text has no ENTRY computation: pass compiled.as_text()")
    mult, unknown = _multiplicities(comps, entry)
    once, _ = _multiplicities(comps, entry, trip_counts=False)
    cache = {tuple(int(d) for d in s) for s in kv_cache_shapes}
    dots, targets, flops, flops_once, copies, attn_flops = [], set(), 0, 0, 0, 0.0
    for comp, instrs in comps.items():
        for instr in instrs:
            op, attrs = instr["opcode"], instr["attrs"]
            target = re.search(r'custom_call_target="([^"]+)"', attrs) if op == "custom-call" else None
            if target:
                targets.add(target.group(1))
            is_gemm = target is not None and re.search(r"gemm|matmul", target.group(1), re.I)
            if target and _is_cudnn_attention(target.group(1)):
                attn_flops += _fused_attention_flops(target.group(1), instr, shapes) * mult.get(comp, 0)
            if op in ("copy", "copy-start") and instr["shape"] and instr["shape"][1] in cache:
                copies += mult.get(comp, 0)
            if op != "dot" and not is_gemm:
                continue
            operands = [_operand_shape(o, shapes) for o in instr["operands"][:2]]
            dots.append(dict(operands=operands, result=instr["shape"]))
            contracting = _dims(attrs, "lhs_contracting_dims") if op == "dot" else _gemm_contracting(attrs)
            if operands[0] and instr["shape"]:
                k = math.prod(operands[0][1][i] for i in contracting if i < len(operands[0][1]))
                flops += 2 * math.prod(instr["shape"][1]) * k * mult.get(comp, 0)
                flops_once += 2 * math.prod(instr["shape"][1]) * k * once.get(comp, 0)
    return _dot_summary(dots, vocab_size) | dict(
        format="hlo",
        num_partitions=_num_partitions(hlo_text),
        cudnn_attention=any(_is_cudnn_attention(t) for t in targets),
        custom_call_targets=sorted(targets),
        kv_cache_copies=copies,
        dot_flops=float(flops),
        dot_flops_loops_once=float(flops_once),
        fused_attention_flops=attn_flops,
        executed_flops=float(flops) + attn_flops,
        unknown_trip_counts=unknown,
    )


def _fused_attention_flops(target: str, instr: dict, shapes) -> float:
    q, k = (_operand_shape(o, shapes) for o in (instr["operands"] + ["", ""])[:2])
    if not q or not k or len(k[1]) < 2:
        return 0.0
    rhs_batch = _json_dims(instr["attrs"], "bmm1_dot_dimension_numbers", "rhs_batch_dimensions")
    rhs_contract = _json_dims(instr["attrs"], "bmm1_dot_dimension_numbers", "rhs_contracting_dimensions")
    if rhs_batch is not None and rhs_contract is not None:
        seq = math.prod(d for i, d in enumerate(k[1]) if i not in rhs_batch + rhs_contract)
    else:
        seq = k[1][1]
    matmuls = 5 if "backward" in target.lower() else 2
    causal = re.search(r'"mask_type":"[A-Z_]*CAUSAL', instr["attrs"]) is not None
    return matmuls * 2.0 * math.prod(q[1]) * seq * (0.5 if causal else 1.0)


def _json_dims(attrs: str, block: str, key: str) -> tuple[int, ...] | None:
    m = re.search(rf'"{block}":\{{[^}}]*"{key}":\[([^\]]*)\]', attrs)
    return tuple(int(d.strip('" ')) for d in m.group(1).split(",") if d.strip('" ')) if m else None
