"""Reference cells as literal data, looked up by name (never built by ``eval``).

Every cell reads ``x`` at the hidden width (the model embeds or projects its
input first). Names and equations follow the paper (Jozefowicz et al., 2015);
``gru`` and ``lstm`` follow PyTorch's ``nn.GRU`` / ``nn.LSTM`` exactly, so that
:meth:`cellsearch.CellRNN.from_torch` can copy their weights.

The LSTM family of Greff et al. (2017), "LSTM: A Search Space Odyssey": their vanilla LSTM
``lstm_peephole`` (with ``y`` the output, ``*`` elementwise and ``p_*`` learned per-unit vectors,
the ``scale`` op)::

    z = tanh(W_z x + R_z y + b_z)                      block input
    i = sigmoid(W_i x + R_i y + p_i * c + b_i)         input gate
    f = sigmoid(W_f x + R_f y + p_f * c + b_f)         forget gate
    c' = z * i + c * f
    o = sigmoid(W_o x + R_o y + p_o * c' + b_o)        output gate (peeks at the new cell state)
    y' = tanh(c') * o

and its eight variants: ``lstm_nig`` (no input gate, i = 1), ``lstm_nfg`` (no forget gate, f = 1),
``lstm_nog`` (no output gate, o = 1), ``lstm_niaf`` (no input activation, z = its
pre-activation), ``lstm_noaf`` (no output activation, y' = c' * o), ``lstm_np`` (no peepholes),
``lstm_cifg`` (coupled input and forget gate, f = 1 - i, the ``one_minus`` op, and no forget-gate
parameters) and ``lstm_fgr`` (full gate recurrence: the three gates also read the previous step's
i, f and o through nine more matrices, so i, f and o are states of the cell). Biases start at 0,
as in ``lstm``. Without peepholes the vanilla LSTM is exactly ``lstm`` (the nn.LSTM form), so
``lstm_np`` is an *alias* of ``lstm`` (:data:`ALIASES`): the same cell and hash under a second
name, accepted by :func:`get` and :func:`resolve_cell` but not listed twice by :func:`names`.

:func:`resolve_cell` is how commands name a cell: a reference name here, or a cell file.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from cellsearch.errors import UserError
from cellsearch.spec import CellSpec

__all__ = ["get", "names", "known", "resolve_cell", "REFERENCE_CELLS", "ALIASES", "GREFF_CELLS"]


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


def _greff(input_gate: bool = True, forget_gate: bool = True, output_gate: bool = True,
           input_activation: bool = True, output_activation: bool = True, peepholes: bool = True,
           coupled: bool = False, full_recurrence: bool = False) -> dict:
    # Greff et al. (2017), eqs. (1)-(6) and section 3's variants; see the module doc.
    states = ["h", "c"] + (["i", "f", "o"] if full_recurrence else [])
    recurrent = ("h", "i", "f", "o") if full_recurrence else ("h",)
    nodes: dict[str, Any] = {"z_pre": _lin("x", "h")}
    block = "z_pre"
    if input_activation:
        nodes["z"] = _op("tanh", "z_pre")
        block = "z"
    # gate nodes are i_t, f_t, o_t when the previous gates are states called i, f, o
    names = {g: f"{g}_t" if full_recurrence else g for g in "ifo"}

    def gate(g: str, peeks_at: str) -> str:
        nodes[f"{g}_pre"] = _lin("x", *recurrent)
        pre = f"{g}_pre"
        if peepholes:
            nodes[f"{g}_peep"] = _op("scale", peeks_at)
            nodes[f"{g}_sum"] = _op("add", pre, f"{g}_peep")
            pre = f"{g}_sum"
        nodes[names[g]] = _op("sigmoid", pre)
        return names[g]

    write = block
    outputs: dict[str, str] = {}
    if input_gate:
        i = gate("i", "c")
        nodes["iz"] = _op("mul", i, block)
        write = "iz"
        outputs["i"] = i
    keep = "c"
    if coupled:
        nodes[names["f"]] = _op("one_minus", names["i"])
    elif forget_gate:
        outputs["f"] = gate("f", "c")
    if coupled or forget_gate:
        nodes["fc"] = _op("mul", names["f"], "c")
        keep = "fc"
    nodes["c_new"] = _op("add", keep, write)
    squashed = "c_new"
    if output_activation:
        nodes["c_act"] = _op("tanh", "c_new")
        squashed = "c_act"
    out = squashed
    if output_gate:
        outputs["o"] = gate("o", "c_new")
        nodes["h_new"] = _op("mul", names["o"], squashed)
        out = "h_new"
    result = {"h": out, "c": "c_new"}
    if full_recurrence:
        result |= {g: outputs[g] for g in "ifo"}
    return {"states": states, "nodes": nodes, "outputs": result}


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
    # Greff et al. (2017): the vanilla (peephole) LSTM and its variants (lstm_np is an alias of lstm)
    "lstm_peephole": _greff(),
    "lstm_nig": _greff(input_gate=False),
    "lstm_nfg": _greff(forget_gate=False),
    "lstm_nog": _greff(output_gate=False),
    "lstm_niaf": _greff(input_activation=False),
    "lstm_noaf": _greff(output_activation=False),
    "lstm_cifg": _greff(coupled=True),
    "lstm_fgr": _greff(full_recurrence=True),
}

#: Second names of reference cells: name -> the cell it names (the same graph and hash).
ALIASES: Mapping[str, str] = MappingProxyType({"lstm_np": "lstm"})
#: The cells of Jozefowicz et al. (2015) (the zoo before Greff et al.'s family joined it): what a fidelity study
#: trains by default, so that a study made before the family existed resumes with the same cells.
PAPER_CELLS = ("tanh_rnn", "lstm", "lstm_b", "lstm_f", "lstm_i", "lstm_o", "gru", "gru_cho", "mut1", "mut2", "mut3")
#: Greff et al.'s nine cells, vanilla first, in the paper's order of variants.
GREFF_CELLS = ("lstm_peephole", "lstm_nig", "lstm_nfg", "lstm_nog", "lstm_niaf", "lstm_noaf", "lstm_np",
               "lstm_cifg", "lstm_fgr")

#: name -> the cell's plain-data description (read-only).
REFERENCE_CELLS: Mapping[str, Mapping[str, Any]] = MappingProxyType(_CELLS)
_BUILT: dict[str, CellSpec] = {}


def names() -> list[str]:
    """Names of the reference cells, in a stable order (each cell once: aliases are left out)."""
    return list(_CELLS)


def known(name: str) -> bool:
    """Whether ``name`` is a reference cell or an alias of one (what :func:`get` accepts)."""
    return name in _CELLS or name in ALIASES


def get(name: str) -> CellSpec:
    """The reference cell called ``name`` (a :class:`CellSpec`, shared and immutable); aliases included."""
    if not known(name):
        raise KeyError(f"unknown reference cell {name!r}; known: {', '.join([*_CELLS, *ALIASES])}")
    if name not in _BUILT:
        data = _CELLS[ALIASES.get(name, name)]
        _BUILT[name] = CellSpec(states=data["states"], nodes=data["nodes"], outputs=data["outputs"], name=name)
    return _BUILT[name]


def resolve_cell(name_or_path: str) -> CellSpec:
    """A reference cell by name, or a cell file (.json/.yaml/.yml) by path (``train``, ``show``, ``retrain``)."""
    if known(name_or_path):
        return get(name_or_path)
    path = Path(name_or_path)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"no cell file at {path}")
        return CellSpec.load(path)
    raise UserError(f"{name_or_path!r} is neither a reference cell ({', '.join(names())}) nor a cell file")
