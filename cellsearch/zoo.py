"""Reference cells as literal data, looked up by name (never built by ``eval``).

Every cell reads ``x`` at the hidden width (the model embeds or projects its
input first). Names and equations follow the paper (Jozefowicz et al., 2015);
``gru`` and ``lstm`` follow PyTorch's ``nn.GRU`` / ``nn.LSTM`` exactly, so that
:meth:`cellsearch.CellRNN.from_torch` can copy their weights.

:func:`resolve_cell` is how commands name a cell: a reference name here, or a cell file.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from cellsearch.errors import UserError
from cellsearch.spec import CellSpec

__all__ = ["get", "names", "resolve_cell", "REFERENCE_CELLS"]


def _lin(*inputs: str, bias: float = 0.0, diag: float = 0.0) -> dict[str, Any]:
    node: dict[str, Any] = {"op": "linear", "inputs": list(inputs)}
    if bias:
        node["bias"] = bias
    if diag:
        node["diag"] = diag
    return node


def _op(op: str, *inputs: str) -> dict[str, Any]:
    return {"op": op, "inputs": list(inputs)}


def _lstm(forget: bool = True, input_gate: bool = True, output_gate: bool = True, forget_bias: float = 0.0) -> dict:
    # i, f, g, o in PyTorch's order; c' = f*c + i*g; h' = o*tanh(c').
    nodes: dict[str, Any] = {
        "g_pre": _lin("x", "h"),
        "g": _op("tanh", "g_pre"),
    }
    if input_gate:
        nodes |= {"i_pre": _lin("x", "h"), "i": _op("sigmoid", "i_pre"), "ig": _op("mul", "i", "g")}
        write = "ig"
    else:
        write = "g"
    if forget:
        nodes |= {"f_pre": _lin("x", "h", bias=forget_bias), "f": _op("sigmoid", "f_pre"), "fc": _op("mul", "f", "c")}
        keep = "fc"
    else:
        keep = "c"
    nodes["c_new"] = _op("add", keep, write)
    nodes["c_act"] = _op("tanh", "c_new")
    if output_gate:
        nodes |= {"o_pre": _lin("x", "h"), "o": _op("sigmoid", "o_pre"), "h_new": _op("mul", "o", "c_act")}
        out = "h_new"
    else:
        out = "c_act"
    return {"states": ["h", "c"], "nodes": nodes, "outputs": {"h": out, "c": "c_new"}}


def _gated_update(candidate: str) -> dict[str, Any]:
    # h' = z*h + (1-z)*n  ==  n + z*(h - n): no constant node needed.
    return {
        "h_minus_n": _op("sub", "h", candidate),
        "z_gap": _op("mul", "z", "h_minus_n"),
        "h_new": _op("add", candidate, "z_gap"),
    }


def _mut_update(candidate: str) -> dict[str, Any]:
    # MUT1-3 write h' = n*z + h*(1-z)  ==  h + z*(n - h).
    return {
        "n_minus_h": _op("sub", candidate, "h"),
        "z_gap": _op("mul", "z", "n_minus_h"),
        "h_new": _op("add", "h", "z_gap"),
    }


_CELLS: dict[str, dict[str, Any]] = {
    # h' = tanh(W_x x + W_h h + b)
    "tanh_rnn": {
        "states": ["h"],
        "nodes": {"pre": _lin("x", "h"), "h_new": _op("tanh", "pre")},
        "outputs": {"h": "h_new"},
    },
    "lstm": _lstm(),
    "lstm_b": _lstm(forget_bias=1.0),
    "lstm_f": _lstm(forget=False),
    "lstm_i": _lstm(input_gate=False),
    "lstm_o": _lstm(output_gate=False),
    # PyTorch nn.GRU: n = tanh(W_in x + b_in + r*(W_hn h + b_hn)); h' = (1-z)*n + z*h
    "gru": {
        "states": ["h"],
        "nodes": {
            "r_pre": _lin("x", "h"),
            "r": _op("sigmoid", "r_pre"),
            "z_pre": _lin("x", "h"),
            "z": _op("sigmoid", "z_pre"),
            "n_x": _lin("x"),
            "n_h": _lin("h"),
            "r_n_h": _op("mul", "r", "n_h"),
            "n_pre": _op("add", "n_x", "r_n_h"),
            "n": _op("tanh", "n_pre"),
            **_gated_update("n"),
        },
        "outputs": {"h": "h_new"},
    },
    # Cho et al. / the paper: n = tanh(W_xh x + W_hh (r*h) + b_h); h' = z*h + (1-z)*n
    "gru_cho": {
        "states": ["h"],
        "nodes": {
            "r_pre": _lin("x", "h"),
            "r": _op("sigmoid", "r_pre"),
            "z_pre": _lin("x", "h"),
            "z": _op("sigmoid", "z_pre"),
            "r_h": _op("mul", "r", "h"),
            "n_pre": _lin("x", "r_h"),
            "n": _op("tanh", "n_pre"),
            **_gated_update("n"),
        },
        "outputs": {"h": "h_new"},
    },
    # MUT1: z = sigm(W_xz x + b_z); r = sigm(W_xr x + W_hr h + b_r);
    #       h' = tanh(W_hh (r*h) + tanh(x) + b_h)*z + h*(1-z)
    "mut1": {
        "states": ["h"],
        "nodes": {
            "z_pre": _lin("x"),
            "z": _op("sigmoid", "z_pre"),
            "r_pre": _lin("x", "h"),
            "r": _op("sigmoid", "r_pre"),
            "r_h": _op("mul", "r", "h"),
            "hh": _lin("r_h"),
            "x_act": _op("tanh", "x"),
            "n_pre": _op("add", "hh", "x_act"),
            "n": _op("tanh", "n_pre"),
            **_mut_update("n"),
        },
        "outputs": {"h": "h_new"},
    },
    # MUT2: z = sigm(W_xz x + W_hz h + b_z); r = sigm(x + W_hr h + b_r);
    #       h' = tanh(W_hh (r*h) + W_xh x + b_h)*z + h*(1-z)
    "mut2": {
        "states": ["h"],
        "nodes": {
            "z_pre": _lin("x", "h"),
            "z": _op("sigmoid", "z_pre"),
            "r_h_proj": _lin("h"),
            "r_pre": _op("add", "x", "r_h_proj"),
            "r": _op("sigmoid", "r_pre"),
            "r_h": _op("mul", "r", "h"),
            "n_pre": _lin("r_h", "x"),
            "n": _op("tanh", "n_pre"),
            **_mut_update("n"),
        },
        "outputs": {"h": "h_new"},
    },
    # MUT3: z = sigm(W_xz x + W_hz tanh(h) + b_z); r = sigm(W_xr x + W_hr h + b_r);
    #       h' = tanh(W_hh (r*h) + W_xh x + b_h)*z + h*(1-z)
    "mut3": {
        "states": ["h"],
        "nodes": {
            "h_act": _op("tanh", "h"),
            "z_pre": _lin("x", "h_act"),
            "z": _op("sigmoid", "z_pre"),
            "r_pre": _lin("x", "h"),
            "r": _op("sigmoid", "r_pre"),
            "r_h": _op("mul", "r", "h"),
            "n_pre": _lin("r_h", "x"),
            "n": _op("tanh", "n_pre"),
            **_mut_update("n"),
        },
        "outputs": {"h": "h_new"},
    },
}

#: name -> the cell's plain-data description (read-only).
REFERENCE_CELLS: Mapping[str, Mapping[str, Any]] = MappingProxyType(_CELLS)
_BUILT: dict[str, CellSpec] = {}


def names() -> list[str]:
    """Names of the reference cells, in a stable order."""
    return list(_CELLS)


def get(name: str) -> CellSpec:
    """The reference cell called ``name`` (a :class:`CellSpec`, shared and immutable)."""
    if name not in _CELLS:
        raise KeyError(f"unknown reference cell {name!r}; known: {', '.join(_CELLS)}")
    if name not in _BUILT:
        data = _CELLS[name]
        _BUILT[name] = CellSpec(states=data["states"], nodes=data["nodes"], outputs=data["outputs"], name=name)
    return _BUILT[name]


def resolve_cell(name_or_path: str) -> CellSpec:
    """A reference cell by name, or a cell file (.json/.yaml/.yml) by path (``train``, ``show``, ``retrain``)."""
    if name_or_path in _CELLS:
        return get(name_or_path)
    path = Path(name_or_path)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"no cell file at {path}")
        return CellSpec.load(path)
    raise UserError(f"{name_or_path!r} is neither a reference cell ({', '.join(names())}) nor a cell file")
