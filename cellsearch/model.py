"""The sequence models the training loop trains, their sizing from a parameter budget, and their losses.

A model is a language-model-shaped network: an embedding of the hidden width ->
the cell's layers (:class:`~cellsearch.compiler.CellRNN`) -> dropout -> a linear softmax layer
(logits). :class:`SequenceModel` is one such model; :class:`BatchedSequenceModel` is K of them,
of one cell and one shape, stacked along a leading *member* dimension (the cell's layers are a
:class:`~cellsearch.compiler.batched.BatchedCellRNN`), so that settings of a cell that differ only
in numbers train as one model. Parameters of the batched model have the names of the single one
with a leading member dimension, so :meth:`BatchedSequenceModel.from_members` /
:meth:`BatchedSequenceModel.member` convert by name.

The hidden width is solved from the parameter budget (:func:`solve_hidden_size`), so that
different cells are compared at equal size, as in the paper; :func:`build_model` builds and
initialises a model at that width. :func:`masked_loss` (one model) and :func:`member_losses`
(a batched model, one loss per member) are the loss the training loop minimises and scores.

Regularisers (:class:`~cellsearch.hparams.HyperParams` ``dropout_mode`` and ``layer_norm``): with
``dropout_mode="variational"`` the model applies no dropout of its own; its
:class:`~cellsearch.compiler.CellRNN` drops the embedding (its input), the recurrent state and
its output with one mask per sequence (Gal & Ghahramani, 2016, see :mod:`cellsearch.compiler.module`),
so the model is Gal & Ghahramani's variational LSTM when the cell is an LSTM. ``layer_norm``
normalises every linear node of the cell (Ba et al., 2016). Both travel to the batched model, and
members of one batched model share them. The layer-norm gains (one vector per linear node and layer)
are not part of the parameter budget: the width is the plain cell's, so a cell is compared at the
same width with and without normalisation (an LSTM layer of width 650 gains 2,600 parameters).

Why a module of its own: the compiler (:mod:`cellsearch.compiler`) turns a cell into layers and
knows nothing of models or training; the training loop (:mod:`cellsearch.training`), checkpoints
(which rebuild a model to load its weights) and the compiled training step all need the models and
their losses, and import them from here.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from cellsearch.compiler import CellRNN
from cellsearch.compiler.batched import (
    BatchedCellRNN,
    check_generators,
    check_member_count,
    member_dropout,
    member_state,
    stack_members,
    take_members,
)
from cellsearch.compiler.module import inverted_dropout
from cellsearch.hparams import HyperParams
from cellsearch.spec import CellSpec
from cellsearch.tasks.base import Task

__all__ = [
    "SequenceModel",
    "BatchedSequenceModel",
    "model_parameter_count",
    "solve_hidden_size",
    "build_model",
    "masked_loss",
    "member_losses",
]


# ---------------------------------------------------------------------- sizing
def model_parameter_count(spec: CellSpec, vocab_size: int, num_layers: int, hidden_size: int) -> int:
    """Learned parameters of the whole model: embedding, ``num_layers`` cells and the softmax layer."""
    embedding = vocab_size * hidden_size
    softmax = hidden_size * vocab_size + vocab_size
    return embedding + num_layers * spec.parameter_count(hidden_size) + softmax


def solve_hidden_size(spec: CellSpec, vocab_size: int, num_layers: int, parameter_budget: int) -> int:
    """The largest hidden width whose model fits ``parameter_budget`` parameters (at least 1).

    A cell's parameter count per layer is a quadratic ``a*H^2 + b*H`` in the
    width ``H`` (``a`` square matrices and ``b`` bias vectors), and the embedding
    and softmax add ``2*vocab*H + vocab``; the quadratic formula gives the
    answer, which is then corrected by integer steps against
    :func:`model_parameter_count` (so rounding can never break the budget).
    Width 1 is returned when even that exceeds the budget.
    """
    count = lambda width: model_parameter_count(spec, vocab_size, num_layers, width)  # noqa: E731
    quadratic = (count(2) - 2 * count(1) + count(0)) / 2
    linear = count(1) - count(0) - quadratic
    constant = count(0) - parameter_budget
    if quadratic > 0:
        width = int((-linear + math.sqrt(max(linear * linear - 4 * quadratic * constant, 0.0))) / (2 * quadratic))
    else:
        width = int(-constant // linear) if linear > 0 else 1
    width = max(width, 1)
    while width > 1 and count(width) > parameter_budget:
        width -= 1
    while count(width + 1) <= parameter_budget:
        width += 1
    return width


# ----------------------------------------------------------------------- models
class SequenceModel(nn.Module):
    """Embedding of the hidden width -> CellRNN -> dropout -> linear softmax (logits).

    With ``dropout_mode="variational"`` the CellRNN does all the dropping, with per-sequence masks
    (see the module doc); ``layer_norm`` is the CellRNN's.
    """

    def __init__(self, spec: CellSpec, vocab_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 *, dropout_mode: str = "standard", layer_norm: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.rnn = CellRNN(spec, hidden_size, hidden_size, num_layers=num_layers, dropout=dropout,
                           dropout_mode=dropout_mode, layer_norm=layer_norm)
        # the variational CellRNN masks its input and output itself, once per sequence
        self.dropout_probability = 0.0 if dropout_mode == "variational" else float(dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def reset_parameters(self, init_scale: float) -> None:
        """The paper's init: uniform in +-init_scale/sqrt(width); softmax bias zero."""
        bound = init_scale / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.embedding.weight.uniform_(-bound, bound)
            self.decoder.weight.uniform_(-bound, bound)
            self.decoder.bias.zero_()
        self.rnn.reset_parameters(init_scale)

    def forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """``tokens`` (time, batch) -> logits (time, batch, vocab) and the final state."""
        embedded = self._dropout(self.embedding(tokens))
        output, state = self.rnn(embedded, state)
        return self.decoder(self._dropout(output)), state

    def _dropout(self, values: torch.Tensor) -> torch.Tensor:
        # not nn.Dropout: its CUDA kernel draws masks a batched member could not reproduce (inverted_dropout)
        if not self.training or self.dropout_probability == 0:
            return values
        return inverted_dropout(values, self.dropout_probability)


def build_model(spec: CellSpec, task: Task, hparams: HyperParams) -> SequenceModel:
    """The model for ``spec`` on ``task`` at the width that fits ``hparams.parameter_budget``, initialised."""
    hidden_size = solve_hidden_size(spec, task.vocab_size, hparams.num_layers, hparams.parameter_budget)
    model = SequenceModel(spec, task.vocab_size, hidden_size, hparams.num_layers, hparams.dropout,
                          dropout_mode=hparams.dropout_mode, layer_norm=hparams.layer_norm)
    model.reset_parameters(hparams.init_scale)
    return model


class BatchedSequenceModel(nn.Module):
    """``members`` :class:`SequenceModel` of one cell and shape as one module.

    Embedding ``(K, vocab, hidden)`` -> :class:`BatchedCellRNN` -> dropout -> softmax layer
    ``(K, vocab, hidden)`` with bias ``(K, vocab)``. ``forward(tokens, state)``: ``tokens`` is
    ``(T, B)`` shared by every member (the training loop's stream) or ``(K, T, B)``; returns logits
    ``(K, T, B, vocab)`` and the state. Dropout masks come from ``generators`` (see
    :class:`BatchedCellRNN`).

    With shared tokens, no active dropout on the embedding and a vocabulary smaller than the number
    of positions, the first layer reads the embedding table directly (``table_lookup``, on by
    default; see :func:`table_source`): its input projections cost a vocabulary's worth of rows
    instead of ``T * B``. The result is the same up to rounding.
    """

    def __init__(self, spec: CellSpec, members: int, vocab_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, generators: Sequence[torch.Generator] | None = None, *,
                 dropout_mode: str = "standard", layer_norm: bool = False) -> None:
        super().__init__()
        self.members = check_member_count(members)
        self.spec = spec
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout_probability = float(dropout)
        self.dropout_mode = dropout_mode
        self.layer_norm = layer_norm
        self.generators = check_generators(generators, self.members)
        self.embedding = nn.Module()
        self.embedding.weight = nn.Parameter(torch.zeros(members, vocab_size, hidden_size))
        self.rnn = BatchedCellRNN(spec, members, hidden_size, hidden_size, num_layers, dropout, generators,
                                  dropout_mode=dropout_mode, layer_norm=layer_norm)
        self.decoder = nn.Module()
        self.decoder.weight = nn.Parameter(torch.zeros(members, vocab_size, hidden_size))
        self.decoder.bias = nn.Parameter(torch.zeros(members, vocab_size))
        self.table_lookup = True

    @classmethod
    def from_members(cls, models: Sequence[nn.Module],
                     generators: Sequence[torch.Generator] | None = None) -> "BatchedSequenceModel":
        """One batched model holding ``models`` (``SequenceModel`` of the same cell, vocabulary, width, layers,
        dropout)."""
        first = models[0]
        shape = lambda m: (m.rnn.spec.hash, m.embedding.num_embeddings, m.hidden_size, m.rnn.num_layers,  # noqa: E731
                           m.rnn.dropout, m.rnn.dropout_mode, m.rnn.layer_norm)
        if any(shape(m) != shape(first) for m in models[1:]):
            raise ValueError("BatchedSequenceModel.from_members: members must share cell, vocabulary, width, layers, "
                             "dropout (probability and mode) and layer_norm")
        reference = first.embedding.weight
        batched = cls(first.rnn.spec, len(models), first.embedding.num_embeddings, first.hidden_size,
                      first.rnn.num_layers, first.rnn.dropout, generators, dropout_mode=first.rnn.dropout_mode,
                      layer_norm=first.rnn.layer_norm)
        batched.to(device=reference.device, dtype=reference.dtype)
        stack_members(batched, models)
        return batched

    def member(self, index: int) -> nn.Module:
        """Member ``index`` as a separate :class:`SequenceModel` (a copy of its weights)."""
        reference = self.embedding.weight
        with torch.random.fork_rng(devices=[]):  # its initial values are overwritten; the global RNG stays as it was
            model = SequenceModel(self.spec, self.vocab_size, self.hidden_size, self.num_layers,
                                  self.dropout_probability, dropout_mode=self.dropout_mode,
                                  layer_norm=self.layer_norm)
        model.to(device=reference.device, dtype=reference.dtype)
        model.load_state_dict(self.member_state(index))
        return model

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s parameters by ``SequenceModel`` name (views; clone to keep them)."""
        return member_state(self, index)

    def take(self, indices: Sequence[int]) -> "BatchedSequenceModel":
        """A new model with only the members at ``indices`` (weights copied, generators shared)."""
        return take_members(self, indices, lambda count, generators: BatchedSequenceModel(
            self.spec, count, self.vocab_size, self.hidden_size, self.num_layers, self.dropout_probability, generators,
            dropout_mode=self.dropout_mode, layer_norm=self.layer_norm))

    def _dropout(self, values: torch.Tensor) -> torch.Tensor:
        if not (self.dropout_probability and self.training) or self.dropout_mode == "variational":
            return values  # variational: the cell layers drop, once per sequence
        return member_dropout(values, self.dropout_probability, self.generators)

    def forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        members = self.members
        dropping = self.dropout_probability > 0 and self.training
        if tokens.dim() == 2 and self.table_lookup and not dropping and self.vocab_size < tokens.numel():
            output, state = self.rnn(self.embedding.weight, state, tokens=tokens)
        else:
            if tokens.dim() == 2:
                # a shared stream: one lookup of every member's table (K, T*B, hidden)
                embedded = self.embedding.weight.index_select(1, tokens.reshape(-1)).view(members, *tokens.shape, -1)
            else:
                rows = torch.arange(members, device=tokens.device).view(members, 1, 1)
                embedded = self.embedding.weight[rows, tokens]
            output, state = self.rnn(self._dropout(embedded), state)
        output = self._dropout(output)
        flat = output.reshape(members, -1, self.hidden_size)
        logits = torch.baddbmm(self.decoder.bias.unsqueeze(1), flat, self.decoder.weight.transpose(1, 2))
        return logits.view(*output.shape[:-1], self.vocab_size), state


# ----------------------------------------------------------------------- losses
def masked_loss(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor | None):
    """Mean cross-entropy over the scored targets, their count, and the number predicted exactly."""
    losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    correct = logits.argmax(-1).reshape(-1) == targets.reshape(-1)
    if scored is None:
        return losses.mean(), losses.numel(), correct.sum()
    weights = scored.reshape(-1)
    count = int(weights.sum())
    return (losses * weights).sum() / max(count, 1), count, (correct & weights).sum()


def member_losses(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor | None):
    """:func:`masked_loss` for logits ``(K, T, B, vocab)`` and shared targets."""
    members, vocab = logits.shape[0], logits.shape[-1]
    flat_targets = targets.reshape(-1)
    losses = nn.functional.cross_entropy(
        logits.reshape(-1, vocab), flat_targets.repeat(members), reduction="none"
    ).view(members, -1)
    correct = logits.argmax(-1).reshape(members, -1) == flat_targets
    if scored is None:
        return losses.mean(1), flat_targets.numel(), correct.sum(1)
    weights = scored.reshape(-1)
    count = int(weights.sum())
    return (losses * weights).sum(1) / max(count, 1), count, (correct & weights).sum(1)
