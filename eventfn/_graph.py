"""``eventfn graph``: the app's choreography as a Mermaid flowchart, so that no flow is hidden.

Nodes are destinations (by kind), the event types on the app's event bus, handlers, and one node
for publishers outside the app. Edges are subscriptions (destination or event type to handler,
labelled with the group) and the flows each handler declares with ``emits=[...]``. A destination
or event type that no handler declares emitting is fed from outside, and drawn so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from eventfn.app import App
from eventfn.subscriptions import Subscription

_SHAPES = {
    "queue": ('[["', '"]]'),  # a subroutine box: work waiting to be done
    "topic": ('{{"', '"}}'),  # a hexagon: facts fanned out
    "stream": ('[("', '")]'),  # a cylinder: an ordered log
}


class _Graph:
    def __init__(self, app: App) -> None:
        self.app = app
        self.nodes: dict[str, str] = {}  # id -> declaration
        self.edges: list[str] = []
        self.fed: set[str] = set()  # node ids something in the app publishes to
        self.inputs: list[str] = []  # node ids handlers consume from, in order
        self.kinds = {s.ref.destination: s.ref.kind for s in app.subscriptions}

    def node(self, prefix: str, name: str, shape: tuple[str, str], label: str) -> str:
        ident = f"{prefix}_{re.sub(r'[^0-9A-Za-z]', '_', name)}"
        self.nodes.setdefault(ident, f"{ident}{shape[0]}{_escape(label)}{shape[1]}")
        return ident

    def destination(self, name: str) -> str:
        kind = self.kinds.get(name, "topic" if name == self.app.event_bus else "queue")
        return self.node(kind[0], name, _SHAPES[kind], f"{kind} {name}")

    def event(self, type: str) -> str:
        return self.node("e", type, ('>"', '"]'), f"{type}")

    def handler(self, sub: Subscription) -> str:
        short = sub.name.rsplit(".", 1)[-1]
        return self.node("h", sub.name, ('("', '")'), short)

    def edge(self, source: str, target: str, label: str | None = None) -> None:
        arrow = f' -- "{_escape(label)}" --> ' if label else " --> "
        line = f"{source}{arrow}{target}"
        if line not in self.edges:
            self.edges.append(line)

    def add(self, sub: Subscription) -> None:
        handler = self.handler(sub)
        ref = sub.ref
        label = ref.group if ref.kind != "queue" else None
        if sub.trigger == "event" and ref.types:
            for type in ref.types:
                source = self.event(type)
                self.inputs.append(source)
                self.edge(source, handler, label)
        else:
            source = self.destination(ref.destination)
            self.inputs.append(source)
            self.edge(source, handler, label)
        emits = sub.options.emits
        if emits is None:
            return
        for type in emits.events:
            target = self.event(type)
            self.fed.add(target)
            self.edge(handler, target, "emits")
        for name in emits.destinations:
            target = self.destination(name)
            self.fed.add(target)
            self.edge(handler, target, "publishes")

    def lines(self) -> Iterator[str]:
        yield "flowchart LR"
        yield f"    %% eventfn graph of app {self.app.name}: sources, destinations, handlers, emits"
        outside = [n for n in dict.fromkeys(self.inputs) if n not in self.fed]
        if outside:
            yield '    outside[/"publishers outside the app"/]'
        events = [d for ident, d in self.nodes.items() if ident.startswith("e_")]
        if events:
            bus = f"bus_{re.sub(r'[^0-9A-Za-z]', '_', self.app.event_bus)}"
            yield f'    subgraph {bus}["event bus {_escape(self.app.event_bus)}"]'
            for declaration in events:
                yield f"        {declaration}"
            yield "    end"
        for ident, declaration in self.nodes.items():
            if not ident.startswith("e_"):
                yield f"    {declaration}"
        for node in outside:
            yield f"    outside --> {node}"
        for edge in self.edges:
            yield f"    {edge}"


def mermaid(app: App) -> str:
    """The app's flows as a Mermaid ``flowchart`` (without the Markdown fence)."""
    graph = _Graph(app)
    for sub in app.subscriptions:
        graph.add(sub)
    return "\n".join(graph.lines()) + "\n"


def _escape(text: str) -> str:
    return text.replace('"', "#quot;")
