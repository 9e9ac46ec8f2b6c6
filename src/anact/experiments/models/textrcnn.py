"""TextRCNN (Lai et al. 2015, "Recurrent Convolutional Neural Networks for Text
Classification"), paper §3.4.

Each word's representation is [left context; embedding; right context] (eq. 3 of
Lai et al.), where the left context of word i is the forward RNN state after word
i−1 and the right context the backward RNN state after word i+1 (zeros at the
ends), computed on the packed sequence so padding never enters a real token's context.
A linear layer + the injected activation gives the latent semantic vector y⁽²⁾
(eq. 4), max-pooled over the real positions (eq. 5), then a linear classifier.

The activation sees the padding mask: a normalized activation
(:class:`anact.NormalizedActivation`) is called as ``act(x, mask=mask)`` so padding
tokens are left out of its batch statistics (paper §3.4); any other module is
called as ``act(x)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import anact

__all__ = ["TextRCNN", "apply_activation"]


def apply_activation(act: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """``act(x, mask=mask)`` for a normalized activation, else ``act(x)``.

    ``x`` (N, L, D), ``mask`` bool (N, L) True at real tokens (or ``None``).
    """
    if mask is not None and isinstance(act, anact.NormalizedActivation):
        return act(x, mask=mask.unsqueeze(-1))
    return act(x)


class TextRCNN(nn.Module):
    """Args:
        activation: factory of the activation after the latent linear layer.
        vocab_size: embedding rows (``<pad>`` = ``padding_idx``).
        num_classes: outputs.
        embed_dim: word embedding size.
        hidden_size: RNN state size per direction (left/right context size).
        latent_size: size of the latent semantic vector y⁽²⁾.
        rnn: ``"lstm"``, ``"gru"`` or ``"rnn"`` (tanh; Lai et al.'s recurrence).
        dropout: dropout on embeddings and on the pooled vector.
        padding_idx: id of ``<pad>``.

    Shape: ``ids`` int64 (N, L), ``mask`` bool (N, L) True at real tokens (each row
    needs at least one; ``None`` = no padding) → logits (N, num_classes).
    """

    def __init__(
        self,
        activation: Callable[[], nn.Module],
        vocab_size: int,
        num_classes: int = 2,
        *,
        embed_dim: int = 128,
        hidden_size: int = 128,
        latent_size: int = 128,
        rnn: Literal["lstm", "gru", "rnn"] = "lstm",
        dropout: float = 0.0,
        padding_idx: int = 0,
    ) -> None:
        super().__init__()
        rnns = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
        if rnn not in rnns:
            raise ValueError(f"rnn must be one of {', '.join(rnns)}, got {rnn!r}")
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.rnn = rnns[rnn](embed_dim, hidden_size, batch_first=True, bidirectional=True)
        self.hidden_size = hidden_size
        self.latent = nn.Linear(2 * hidden_size + embed_dim, latent_size)
        self.act = activation()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(latent_size, num_classes)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        if ids.dim() != 2:
            raise ValueError(f"expected token ids (N, L), got shape {tuple(ids.shape)}")
        n, length = ids.shape
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        elif mask.shape != ids.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match ids {tuple(ids.shape)}")
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("every sequence needs at least one real token (mask all False)")
        emb = self.dropout(self.embedding(ids))  # (N, L, E)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)  # (N, L, 2H)
        fwd, bwd = out[..., : self.hidden_size], out[..., self.hidden_size :]
        # Lai et al. eq. 1–2: c_l(w_i) = forward state at i−1, c_r(w_i) = backward state at i+1
        left = torch.cat([fwd.new_zeros(n, 1, self.hidden_size), fwd[:, :-1]], dim=1)
        right = torch.cat([bwd[:, 1:], bwd.new_zeros(n, 1, self.hidden_size)], dim=1)
        x = torch.cat([left, emb, right], dim=-1)  # eq. 3
        y = apply_activation(self.act, self.latent(x), mask)  # eq. 4, (N, L, latent)
        y = y.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # eq. 5
        return self.fc(self.dropout(y))
