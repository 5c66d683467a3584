"""Human-readable views of a :class:`~cellsearch.spec.CellSpec`: equations, DOT text, PNG drawings.

A ``scale`` node (a learned per-unit vector, the peephole) prints as ``p_NAME * v`` (``*`` is
elementwise, as everywhere in the equations), ``one_minus`` as ``1 - v``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx

from cellsearch.errors import UserError
from cellsearch.outputs import output_file

if TYPE_CHECKING:  # pragma: no cover
    from cellsearch.spec import CellSpec

_ACTIVATION_NAMES = {"tanh": "tanh", "sigmoid": "sigmoid", "relu": "relu"}
#: Node colours of a drawing; learned parameters (linear, scale) in orange.
_COLOURS = {"input": "#9ecae1", "output": "#a1d99b", "linear": "#fdd0a2", "scale": "#fdae6b"}


def _weight_name(operand: str, target: str) -> str:
    # The paper writes W_xz for the matrix from x into gate z; longer names need a separator.
    if len(operand) == 1 and len(target) == 1:
        return f"W_{operand}{target}"
    return f"W_{operand}.{target}"


def _format_constant(value: float) -> str:
    return f"{value:g}"


def _linear_text(spec: "CellSpec", name: str, label: str) -> str:
    node = spec.nodes[name]
    terms = [f"{_weight_name(operand, label)} {operand}" for operand in node.inputs]
    terms.append(f"b_{label}")
    text = " + ".join(terms)
    notes = []
    if node.diag:
        notes.append(f"W init + {_format_constant(node.diag)}*I")
    if node.bias:
        notes.append(f"b_{label} init {_format_constant(node.bias)}")
    return text, notes


def equations(spec: "CellSpec") -> str:
    """One line per value, paper style; single-use linear nodes are folded into their activation."""
    users = {name: spec.users(name) for name in spec.nodes}
    output_of = {}
    for state, target in spec.outputs.items():
        output_of.setdefault(target, []).append(state)
    folded: set[str] = set()
    for name, node in spec.nodes.items():
        if node.op in _ACTIVATION_NAMES and node.inputs[0] in spec.nodes:
            inner = node.inputs[0]
            if spec.nodes[inner].op == "linear" and users[inner] == (name,) and inner not in output_of:
                folded.add(inner)
    lines: list[str] = []
    for name in spec.order:
        if name in folded:
            continue
        node = spec.nodes[name]
        notes: list[str] = []
        if node.op == "linear":
            expr, notes = _linear_text(spec, name, name)
        elif node.op in _ACTIVATION_NAMES:
            operand = node.inputs[0]
            if operand in folded:
                inner, notes = _linear_text(spec, operand, name)
            else:
                inner = operand
            expr = f"{_ACTIVATION_NAMES[node.op]}({inner})"
        elif node.op == "identity":
            expr = node.inputs[0]
        elif node.op == "scale":
            expr = f"p_{name} * {node.inputs[0]}"
        elif node.op == "one_minus":
            expr = f"1 - {node.inputs[0]}"
        else:
            symbol = {"add": "+", "sub": "-", "mul": "*"}[node.op]
            expr = f" {symbol} ".join(node.inputs)
        targets = output_of.get(name, [])
        if targets and not users[name]:
            left = " = ".join(f"{state}'" for state in targets)
            targets = []
        else:
            left = name
        line = f"{left} = {expr}"
        if notes:
            line += "    [" + "; ".join(notes) + "]"
        lines.append(line)
        for state in targets:
            lines.append(f"{state}' = {name}")
    for state, target in spec.outputs.items():
        if target not in spec.nodes:
            lines.append(f"{state}' = {target}")
    return "\n".join(lines)


def _node_label(spec: "CellSpec", name: str) -> str:
    if name in spec.inputs:
        return name if name == "x" else f"{name}(t-1)"
    node = spec.nodes[name]
    label = f"{name}\\n{node.op}"
    if node.op == "linear" and (node.bias or node.diag):
        label += f"\\nb={_format_constant(node.bias)} a={_format_constant(node.diag)}"
    return label


def to_dot(spec: "CellSpec") -> str:
    """Graphviz DOT text: inputs at the bottom, states at the top, learned nodes in orange (as in the drawings).

    Every string in it is an identifier or a whitelisted op, so it needs no escaping."""
    lines = [f"digraph cell_{spec.short_hash} {{", "  rankdir=BT; nodesep=0.35; ranksep=0.45;",
             f'  label="{spec.name or "cell"} ({spec.short_hash})"; labelloc=t; fontname=Helvetica; fontsize=18;',
             "  node [fontname=Helvetica, fontsize=14, style=filled, fillcolor=\"#f0f0f0\", color=\"#555555\"];",
             "  edge [color=\"#444444\", arrowsize=0.8, fontname=Helvetica, fontsize=12];"]
    lines.append("  { rank=min; " + " ".join(spec.inputs) + "; }")
    for name in spec.inputs:
        lines.append(f'  {name} [label="{_node_label(spec, name)}", shape=box, fillcolor="{_COLOURS["input"]}"];')
    for name, node in spec.nodes.items():
        shape = "box" if node.op in ("linear", "scale") else "ellipse"
        colour = _COLOURS.get(node.op, "#f0f0f0")
        lines.append(f'  {name} [label="{_node_label(spec, name)}", shape={shape}, fillcolor="{colour}"];')
    for name, node in spec.nodes.items():
        for position, operand in enumerate(node.inputs):
            attrs = f' [label="{position}"]' if node.op == "sub" else ""
            lines.append(f"  {operand} -> {name}{attrs};")
    outputs = [f"out_{state}" for state in spec.outputs]
    for state, target in spec.outputs.items():
        lines.append(f'  out_{state} [label="{state}(t)", shape=box, fillcolor="{_COLOURS["output"]}"];')
        lines.append(f"  {target} -> out_{state};")
    lines.append("  { rank=max; " + " ".join(outputs) + "; }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_png(spec: "CellSpec", path: Path, engine: str = "auto") -> Path:
    """Draw the graph, inputs at the bottom and outputs at the top, to ``path`` (PNG).

    ``engine``: ``graphviz`` lays it out with Graphviz's ``dot`` (layered, edges routed around the nodes, labels
    at body-text size), ``matplotlib`` with a layered networkx layout (no Graphviz needed; edges are straight
    lines and may cross nodes), ``auto`` (the default) the first when ``dot`` is on the PATH.
    """
    import shutil

    if engine not in ("auto", "graphviz", "matplotlib"):
        raise ValueError(f"engine must be auto, graphviz or matplotlib, not {engine!r}")
    output_file(path, "drawing")
    dot = shutil.which("dot")
    if engine == "graphviz" and dot is None:
        raise UserError("drawing with Graphviz needs its `dot` program (apt-get install graphviz)")
    if engine != "matplotlib" and dot is not None:
        return _draw_with_dot(spec, Path(path), dot)
    return _draw_with_matplotlib(spec, Path(path))


def _draw_with_dot(spec: "CellSpec", path: Path, dot: str) -> Path:
    import subprocess

    done = subprocess.run([dot, "-Tpng", "-Gdpi=96"], input=to_dot(spec).encode(), capture_output=True, timeout=60)
    if done.returncode != 0:
        raise UserError(f"Graphviz could not draw the cell: {done.stderr.decode(errors='replace').strip()[:200]}")
    try:
        path.write_bytes(done.stdout)
    except OSError as error:
        raise UserError(f"cannot write the drawing {path}: {error.strerror or error}") from None
    return path


def _draw_with_matplotlib(spec: "CellSpec", path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graph = spec.to_networkx()
    for state, target in spec.outputs.items():
        graph.add_node(f"{state}(t)", op="output")
        graph.add_edge(target, f"{state}(t)")
    for layer, generation in enumerate(nx.topological_generations(graph)):
        for name in generation:
            graph.nodes[name]["layer"] = layer
    positions = nx.multipartite_layout(graph, subset_key="layer", align="horizontal")
    colours = []
    labels = {}
    for name, attrs in graph.nodes(data=True):
        op = attrs.get("op")
        colours.append(_COLOURS.get(op, "#f0f0f0"))
        labels[name] = name if op in ("input", "output") else f"{name}\n{op}"
    size = max(7.0, 1.5 * max(len(g) for g in nx.topological_generations(graph)))
    height = max(6.0, 1.2 * (1 + max(a["layer"] for _, a in graph.nodes(data=True))))
    figure, axes = plt.subplots(figsize=(size, height))
    nx.draw_networkx(
        graph, positions, ax=axes, labels=labels, node_color=colours, node_size=2600, font_size=10, arrowsize=14,
        edgecolors="#555555",
    )
    axes.set_title(f"{spec.name or 'cell'} ({spec.short_hash})")
    axes.axis("off")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=96)
    except OSError as error:
        raise UserError(f"cannot write the drawing {path}: {error.strerror or error}") from None
    finally:
        plt.close(figure)
    return path
