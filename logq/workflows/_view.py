"""Drawing a workflow: its nodes with their states, as text (``logq tasks
show``) and as a static, self-contained HTML page with an inline SVG
(``logq tasks graph ID --html out.html``: no script, no network).

``nodes(app, wid)`` gathers what to draw, for a graph (chain, group,
chord, DAG) or a durable workflow (its steps, in order); ``text`` and
``html`` only lay it out (pure: they take the list)."""

from __future__ import annotations

import html as _html
import time
from dataclasses import dataclass, field, replace
from typing import Any

from logq._errors import TaskError, TaskNotFound

WAITING = "waiting"     # a graph's task not released yet (its parents run)
COLOURS = {"succeeded": "#2e7d32", "failed": "#c62828", "cancelled": "#757575", "running": "#1565c0",
           "queued": "#6a1b9a", "scheduled": "#8d6e63", "retrying": "#ef6c00", WAITING: "#9e9e9e",
           "sleeping": "#00838f", "current": "#1565c0"}
GLYPHS = {"succeeded": "✔", "failed": "✘", "cancelled": "⊘", "running": "▶", "queued": "…",
          "scheduled": "◷", "retrying": "↻", WAITING: "◌", "sleeping": "◷", "current": "▶"}
_MAX_PER_LAYER = 40


@dataclass
class View:
    """What to draw: ``kind`` (chain, group, chord, dag, after, workflow),
    its ``state`` summary and its ``nodes`` (dicts: id, label, state,
    parents: [indices])."""
    id: str
    kind: str
    state: str
    nodes: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""


def nodes(app: Any, wid: str) -> View:
    """The View of graph or durable workflow ``wid``; raises TaskNotFound."""
    from logq.workflows._plugin import flows_of, joins_of
    j = joins_of(app)
    meta = j.meta(wid)
    if meta is None:
        return _durable(app, wid, flows_of(app))
    ids = j.members(wid)
    store = j.store
    marks = store.markers()
    at = {t: i for i, t in enumerate(ids)}
    out: list[dict[str, Any]] = []
    for i, tid in enumerate(ids):
        node = j.node(tid) or {}
        try:
            state = store.status(tid, marks).state
        except TaskError:
            state = "expired"
        if state in ("scheduled", "queued") and j.waiting(tid):
            state = WAITING
        label = node.get("l") or node.get("n") or tid
        out.append({"id": tid, "label": label, "state": state,
                    "parents": [at[p] for p in node.get("p", ()) if p in at],
                    "handler": i >= meta.get("n", len(ids))})
    counts: dict[str, int] = {}
    for n in out:
        counts[n["state"]] = counts.get(n["state"], 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return View(wid, meta.get("kind", "graph"), summary, out)


def _durable(app: Any, wid: str, flows: Any) -> View:
    st = flows.status(wid)      # raises TaskNotFound
    steps = flows.steps(wid)
    out: list[dict[str, Any]] = []
    for k in sorted(steps):
        h, _p = steps[k]
        state = "succeeded" if h.get("ok", True) and h.get("done", True) else "failed"
        if not h.get("done", True):
            state = WAITING
        if h.get("name") == "sleep":
            state = "succeeded" if time.time_ns() >= h.get("until", 0) else "sleeping"
        out.append({"id": f"{wid}#{k}", "label": f"{k}: {h.get('name')}", "state": state,
                    "parents": [len(out) - 1] if out else []})
    if st.state not in ("succeeded", "failed", "cancelled"):
        out.append({"id": st.current or "", "label": f"{st.state} (run {st.current})",
                    "state": "current" if st.state == "running" else st.state,
                    "parents": [len(out) - 1] if out else []})
    else:
        out.append({"id": wid, "label": f"end: {st.state}", "state": st.state,
                    "parents": [len(out) - 1] if out else []})
    detail = ""
    if st.error:
        detail = f"{st.error.get('type')}: {st.error.get('message')}"
    elif st.waiting:
        detail = f"waiting for event {st.waiting!r}"
    return View(wid, f"workflow {st.name}", st.state, out, detail)


def depths(ns: list[dict[str, Any]]) -> list[int]:
    """Each node's layer: the longest path from a root (parents come first)."""
    d: list[int] = []
    for n in ns:
        d.append(1 + max((d[p] for p in n["parents"] if p < len(d)), default=-1))
    return d


def text(v: View) -> str:
    """The workflow as lines of text: one node a line, indented by its
    layer, its state's glyph, label and id, and its parents when it has
    several (or one that is not the line above)."""
    lines = [f"{v.kind} {v.id}: {v.state}" + (f" — {v.detail}" if v.detail else "")]
    dep = depths(v.nodes)
    for i, n in enumerate(v.nodes):
        ind = "  " * (dep[i] + 1)
        tail = ""
        ps = n["parents"]
        if len(ps) > 1 or (ps and ps[0] != i - 1):
            names = [v.nodes[p]["label"] for p in ps[:5]]
            more = f" +{len(ps) - 5}" if len(ps) > 5 else ""
            tail = f"  ⇐ {', '.join(names)}{more}"
        if n.get("handler"):
            tail += "  (link_error)"
        lines.append(f"{ind}{'└─ ' if ps else ''}{GLYPHS.get(n['state'], '?')} {n['label']}  "
                     f"[{n['state']}]  {n['id']}{tail}")
    return "\n".join(lines)


def html(v: View) -> str:
    """A static page: the DAG as an inline SVG, layers left to right, each
    node a box coloured by its state (layers over _MAX_PER_LAYER nodes show
    that many and a "+N more" box)."""
    dep = depths(v.nodes)
    layers: dict[int, list[int]] = {}
    for i, d in enumerate(dep):
        layers.setdefault(d, []).append(i)
    bw, bh, gx, gy, pad = 190, 34, 70, 14, 20
    pos: dict[int, tuple[int, int]] = {}
    extra: list[tuple[int, int, str]] = []
    for d, idxs in layers.items():
        shown = idxs[:_MAX_PER_LAYER]
        for r, i in enumerate(shown):
            pos[i] = (pad + d * (bw + gx), pad + 40 + r * (bh + gy))
        if len(idxs) > len(shown):
            extra.append((pad + d * (bw + gx), pad + 40 + len(shown) * (bh + gy),
                          f"+{len(idxs) - len(shown)} more"))
    rows = max((len(ix[:_MAX_PER_LAYER]) + (len(ix) > _MAX_PER_LAYER) for ix in layers.values()), default=1)
    width = pad * 2 + (max(layers, default=0) + 1) * (bw + gx)
    height = pad * 2 + 40 + rows * (bh + gy)
    e = _html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
             'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
             f'<text x="{pad}" y="{pad + 14}" font-size="15" font-weight="bold">{e(v.kind)} {e(v.id)}: '
             f'{e(v.state)}</text>']
    for i, n in enumerate(v.nodes):
        if i not in pos:
            continue
        x, y = pos[i]
        for p in n["parents"]:
            if p in pos:
                px, py = pos[p]
                parts.append(f'<path d="M{px + bw},{py + bh // 2} C{px + bw + gx // 2},{py + bh // 2} '
                             f'{x - gx // 2},{y + bh // 2} {x},{y + bh // 2}" fill="none" stroke="#555" '
                             f'stroke-width="1.2" marker-end="url(#arrow)"/>')
    for i, n in enumerate(v.nodes):
        if i not in pos:
            continue
        x, y = pos[i]
        c = COLOURS.get(n["state"], "#424242")
        label = n["label"] if len(n["label"]) <= 24 else n["label"][:23] + "…"
        parts.append(f'<g class="node" data-id="{e(n["id"])}" data-state="{e(n["state"])}">'
                     f'<title>{e(n["label"])} ({e(n["state"])}) {e(n["id"])}</title>'
                     # (white under the tint: an edge that skips a layer passes behind)
                     f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="6" fill="#fff"/>'
                     f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="6" fill="{c}" '
                     f'fill-opacity="0.15" stroke="{c}" stroke-width="2"/>'
                     f'<text x="{x + 8}" y="{y + 14}" fill="#111">{e(label)}</text>'
                     f'<text x="{x + 8}" y="{y + 28}" fill="{c}" font-size="10">{e(n["state"])}</text></g>')
    for x, y, t in extra:
        parts.append(f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="6" fill="#fafafa" '
                     f'stroke="#999" stroke-dasharray="4 3"/><text x="{x + 8}" y="{y + 21}">{e(t)}</text>')
    parts.append("</svg>")
    legend = " ".join(f'<span style="color:{c}">■ {s}</span>' for s, c in COLOURS.items())
    detail = f"<p>{e(v.detail)}</p>" if v.detail else ""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{e(v.kind)} {e(v.id)}</title>"
            "<style>body{font-family:sans-serif;margin:16px;background:#fff}"
            "p{font-size:13px}</style></head><body>"
            f"<h1 style=\"font-size:18px\">{e(v.kind)} {e(v.id)}</h1>{detail}"
            + "".join(parts) + f"<p>{legend}</p></body></html>\n")


def statuses_of(app: Any, wid: str) -> list[Any]:
    """The TaskStatus of each task of graph ``wid`` (for ``list --workflow``)."""
    from logq.workflows._plugin import joins_of
    j = joins_of(app)
    if j.meta(wid) is None:
        raise TaskNotFound(f"no workflow graph {wid!r} in {app.path} (a durable workflow has no "
                           "tasks to list: `logq tasks PATH show ID` draws its steps)")
    store = j.store
    marks = store.markers()
    out = []
    for tid in j.members(wid):
        try:
            st = store.status(tid, marks)
        except TaskError:
            continue
        if st.state in ("scheduled", "queued") and j.waiting(tid):
            st = replace(st, state=WAITING, due=None)
        out.append(st)
    return out


def workflow_of(app: Any, task_id: str) -> str | None:
    """The graph a task belongs to, or None."""
    from logq.workflows._plugin import joins_of
    node = joins_of(app).node(task_id)
    return (node or {}).get("w") or None
