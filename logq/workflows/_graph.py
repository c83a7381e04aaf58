"""Building a graph of tasks from chains, groups, chords and named DAG
nodes: pure (no I/O), so its rules are tested on their own.

A ``Node`` is one task to submit: its signature, its parents (indices of
earlier nodes in the same graph, or ids of tasks submitted before), how it
gets their results (``_joins`` modes) and whether it runs when one of them
failed.  ``build`` flattens a composition into nodes in an order where
every parent comes before its dependants; ``order`` does the same for
named nodes and refuses a cycle (``GraphError``) before anything is put.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from logq._errors import TaskError
from logq.workflows._joins import ALL, ERROR, FIRST, NONE


class GraphError(TaskError, ValueError):
    """A graph that cannot be submitted (a cycle, an unknown node name, a
    part that is not a task); nothing was put."""


@dataclass
class Node:
    sig: Any                                 # logq.tasks Signature
    parents: list[Any] = field(default_factory=list)   # int (index here) or str (a task id)
    mode: int = NONE
    allow_failure: bool = False
    label: str = ""


def _is_sig(x: Any) -> bool:
    return hasattr(x, "task") and hasattr(x, "args") and hasattr(x, "immutable")


class Canvas:
    """A composition: ``Chain``, ``Group`` (a chord is a chain of a group
    and a callback)."""

    kind = "canvas"
    parts: list[Any]


class Chain(Canvas):
    kind = "chain"

    def __init__(self, parts: Iterable[Any]) -> None:
        self.parts = list(parts)
        if not self.parts:
            raise GraphError("a chain needs at least one part")


class Group(Canvas):
    kind = "group"

    def __init__(self, parts: Iterable[Any]) -> None:
        self.parts = list(parts)


def _unwrap(c: Any) -> Any:
    """A chain(...)/group(...) not yet submitted is its canvas."""
    inner = getattr(c, "c", None)
    return inner if isinstance(inner, Canvas) else c


def _ends_in_group(c: Any) -> bool:
    if isinstance(c, Group):
        return True
    return isinstance(c, Chain) and _ends_in_group(_unwrap(c.parts[-1]))


def build(c: Any, nodes: list[Node] | None = None, after: list[int] | None = None,
          many: bool = False, allow_failure: bool = False) -> tuple[list[Node], list[int]]:
    """Append the nodes of ``c`` to ``nodes`` (its entries depend on the
    nodes ``after``; ``many``: those are a group's, so an entry gets the
    list of their results); the nodes and the indices of ``c``'s exits."""
    nodes = [] if nodes is None else nodes
    after = after or []
    c = _unwrap(c)
    if _is_sig(c):
        mode = NONE
        if after and not c.immutable:
            mode = ALL if many else FIRST
        nodes.append(Node(c, list(after), mode, allow_failure and bool(after), c.task.name))
        return nodes, [len(nodes) - 1]
    if isinstance(c, Chain):
        exits, m = after, many
        for i, part in enumerate(c.parts):
            part = _unwrap(part)
            _n, exits = build(part, nodes, exits, m, allow_failure if i else False)
            m = _ends_in_group(part)
        return nodes, exits
    if isinstance(c, Group):
        if not c.parts:
            raise GraphError("a group needs at least one part")
        exits = []
        for part in c.parts:
            _n, ex = build(part, nodes, after, many, allow_failure)
            exits += ex
        return nodes, exits
    raise GraphError(f"not a task signature (task.s(...)), chain or group: {c!r}")


def order(named: dict[str, tuple[Any, list[str], bool, bool]]) -> tuple[list[Node], dict[str, int]]:
    """Named nodes ``name -> (signature, after names, allow_failure,
    pass_results)`` in an order where parents come first (Kahn's
    algorithm); raises GraphError for an unknown name or a cycle."""
    for name, (_sig, after, _af, _pr) in named.items():
        for a in after:
            if a not in named:
                raise GraphError(f"node {name!r} is after {a!r}, which is not a node of this DAG")
            if a == name:
                raise GraphError(f"node {name!r} is after itself: a cycle")
    indeg = {n: len(set(v[1])) for n, v in named.items()}
    children: dict[str, list[str]] = {n: [] for n in named}
    for n, v in named.items():
        for a in dict.fromkeys(v[1]):
            children[a].append(n)
    ready = [n for n in named if indeg[n] == 0]
    out: list[str] = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for c in children[n]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    if len(out) != len(named):
        stuck = sorted(n for n in named if n not in out)
        raise GraphError(f"the DAG has a cycle through {stuck}: refused, nothing submitted")
    at = {n: i for i, n in enumerate(out)}
    nodes = []
    for n in out:
        sig, after, af, pr = named[n]
        parents = [at[a] for a in dict.fromkeys(after)]
        mode = (FIRST if len(parents) == 1 else ALL) if pr and parents else NONE
        nodes.append(Node(sig, parents, mode, af and bool(parents), n))
    return nodes, at


def error_handler(sig: Any) -> Node:
    return Node(sig, [], ERROR, False, f"{sig.task.name} (link_error)")
