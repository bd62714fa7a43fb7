"""The collectives of a compiled step, read from its HLO: kind, bytes per step, async or not.

  stats = collectives.of_hlo(compiled.as_text())
  stats["all-to-all"].bytes_per_step, .ops, .async_ops, .unknown_trips

Shapes in a compiled SPMD program are one device's, so every figure is per device. Bytes are
what the collective moves through its buffers: the result of an all-gather, all-reduce,
all-to-all or collective-permute, the input of a reduce-scatter (XLA:TPU writes a reduce-scatter
as a `fusion` of kind kCustom calling an `all-reduce-scatter` computation). An asynchronous
collective is a `-start` / `-done` pair, or an `async-start` wrapping one: XLA scheduled it to
overlap the compute between the two.

Per step: an instruction inside loops counts once per iteration of each enclosing `while`. A
trip count comes from the loop's `known_trip_count`, else from its condition (`i < constant`,
or `i < n` with n a constant in the loop's initial tuple); a loop whose count cannot be read
(a data-dependent loop, as the searchsorted scans of the expert dispatch) counts once and is
marked, so those bytes are a lower bound.
"""

from __future__ import annotations

import collections
import dataclasses
import re

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "f8e4m3": 1, "f8e4m3b11fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "bf16": 2,
               "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
               "u64": 8, "c64": 8, "c128": 16}

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> (.*) \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass
class KindStats:
    ops: int = 0  # instructions in the program
    async_ops: int = 0  # of them, scheduled asynchronously
    bytes_per_step: float = 0.0  # per device, loops unrolled by their trip counts
    unknown_trips: int = 0  # instructions inside a loop whose trip count could not be read


@dataclasses.dataclass
class _Instruction:
    name: str
    type: str
    opcode: str
    rest: str  # operands and attributes


def array_bytes(type_text: str) -> float:
    """Bytes of an HLO type: an array (`f32[64,40]{1,0}`) or the sum over a tuple's arrays."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype not in DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


def _split_type(text: str) -> tuple[str, str]:
    """(type, what follows it) of `TYPE opcode(...)`: a tuple type is a balanced (...)."""
    if not text.startswith("("):
        head, _, tail = text.partition(" ")
        return head, tail
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return text[:i + 1], text[i + 2:]
    return text, ""


def parse(hlo: str) -> tuple[dict[str, list[_Instruction]], dict[str, str], str]:
    """Computations (name -> instructions), their header input types, and the entry's name."""
    computations: dict[str, list[_Instruction]] = {}
    inputs: dict[str, str] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            if m := _HEADER.match(line):
                current = m.group(1)
                computations[current], inputs[current] = [], m.group(2)
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if m := _INSTRUCTION.match(line):
            type_text, rest = _split_type(line[m.end():])
            opcode, _, rest = rest.partition("(")
            computations[current].append(_Instruction(m.group(1), type_text, opcode, rest))
    return computations, inputs, entry


def _called(inst: _Instruction) -> list[tuple[str, str]]:
    """(attribute, computation) of every computation an instruction calls."""
    found = re.findall(r"\b(condition|body|calls|to_apply|true_computation|false_computation)="
                       r"%([\w.\-]+)", inst.rest)
    for branches in re.findall(r"branch_computations=\{([^}]*)\}", inst.rest):
        found += [("branch", b.strip().lstrip("%")) for b in branches.split(",")]
    return found


def _trip_count(inst: _Instruction, computations, by_name) -> int | None:
    """Iterations of a `while`, where the program states them (module docstring)."""
    if m := re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.rest):
        return int(m.group(1))
    cond = dict(_called(inst)).get("condition")
    body = computations.get(cond, [])
    root = body[-1] if body else None
    if root is None or root.opcode != "compare" or "direction=LT" not in root.rest:
        return None
    operands = re.findall(r"%([\w.\-]+)", root.rest.split(")")[0])
    local = {i.name: i for i in body}
    bound = local.get(operands[1]) if len(operands) == 2 else None
    if bound is None:
        return None
    if bound.opcode == "constant":
        m = re.match(r"(-?\d+)\)", bound.rest)
        return int(m.group(1)) if m else None
    if bound.opcode == "get-tuple-element":  # n carried in the loop state: read its initial value
        index = int(re.search(r"index=(\d+)", bound.rest).group(1))
        init = by_name.get(re.match(r"%([\w.\-]+)", inst.rest).group(1))
        if init is not None and init.opcode == "tuple":
            elements = re.findall(r"%([\w.\-]+)", init.rest.split(")")[0])
            value = by_name.get(elements[index]) if index < len(elements) else None
            if value is not None and value.opcode == "constant":
                m = re.match(r"(-?\d+)\)", value.rest)
                return int(m.group(1)) if m else None
    return None


def _kind(inst: _Instruction, computations) -> tuple[str, bool] | None:
    """(collective kind, asynchronous) of an instruction, or None."""
    op = inst.opcode
    for kind in KINDS:
        if op == kind:
            return kind, False
        if op == f"{kind}-start":
            return kind, True
    calls = [c for _, c in _called(inst)]
    if op == "fusion" and any(c.startswith("all-reduce-scatter") for c in calls):
        return "reduce-scatter", False
    if op == "async-start":
        for c in calls:
            inner = [_kind(i, computations) for i in computations.get(c, [])]
            kinds = [k for k in inner if k]
            if kinds:
                return kinds[0][0], True
    return None


def of_hlo(hlo: str) -> dict[str, KindStats]:
    """Per collective kind: instructions, async ones, bytes per step per device."""
    computations, inputs, entry = parse(hlo)
    by_name = {i.name: i for body in computations.values() for i in body}
    # Multiplier of each computation: iterations per step, summed over its callers.
    multiplier: dict[str, float] = collections.defaultdict(float)
    uncertain: set[str] = set()
    multiplier[entry] = 1.0
    order, seen = [entry], {entry}
    for name in order:  # callers before callees (HLO call graphs are acyclic)
        for inst in computations.get(name, []):
            for attr, callee in _called(inst):
                times = 1
                if inst.opcode == "while" and attr == "body":
                    trips = _trip_count(inst, computations, by_name)
                    if trips is None:
                        uncertain.add(callee)
                    times = trips or 1
                multiplier[callee] += multiplier[name] * times
                if name in uncertain:
                    uncertain.add(callee)
                if callee not in seen:
                    seen.add(callee)
                    order.append(callee)
    stats = {kind: KindStats() for kind in KINDS}
    for name in order:
        for inst in computations.get(name, []):
            found = _kind(inst, computations)
            if not found:
                continue
            kind, is_async = found
            s = stats[kind]
            s.ops += 1
            s.async_ops += is_async
            s.unknown_trips += name in uncertain
            s.bytes_per_step += multiplier[name] * _moved_bytes(inst, kind, inputs, by_name)
    return stats


def _moved_bytes(inst: _Instruction, kind: str, inputs, by_name) -> float:
    if inst.opcode == "fusion":  # all-reduce-scatter: the called computation's input
        callee = next(c for _, c in _called(inst) if c.startswith("all-reduce-scatter"))
        return array_bytes(inputs[callee])
    if kind == "reduce-scatter":
        operand = re.match(r"%([\w.\-]+)", inst.rest)
        source = by_name.get(operand.group(1)) if operand else None
        return array_bytes(source.type) if source else array_bytes(inst.type)
    if inst.opcode.endswith("-start"):  # (operands, results, ...): the larger side
        parts = re.findall(r"[a-z0-9]+\[[0-9,]*\]", inst.type)
        return max((array_bytes(p) for p in parts), default=0.0)
    return array_bytes(inst.type)


def format_table(stats: dict[str, KindStats]) -> list[str]:
    """Report lines: one per kind present."""
    lines = [f"  {'collective':<20}{'ops':>6}{'async':>7}{'GB per step':>14}"]
    for kind, s in stats.items():
        if not s.ops:
            continue
        note = (f"  ({s.unknown_trips} in data-dependent loops: counted once, a lower bound)"
                if s.unknown_trips else "")
        lines.append(f"  {kind:<20}{s.ops:>6}{s.async_ops:>7}{s.bytes_per_step / 1e9:>14.3f}"
                     f"{note}")
    if len(lines) == 1:
        lines.append("  (none: one device, or nothing to exchange)")
    return lines
