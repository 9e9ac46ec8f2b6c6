"""A small Transformer encoder–decoder (Vaswani et al. 2017) for translation studies.

Hand-written layers around ``nn.MultiheadAttention`` so the feed-forward activation
is injected and sees the padding mask: a normalized activation
(:class:`anact.NormalizedActivation`) is called as ``act(h, mask=mask)`` with the
real-token mask of the sequence, so padding stays out of its statistics; other
modules as ``act(h)``. Pre-LN (default; a final LayerNorm on each stack) or post-LN
(the original). Sinusoidal positions, embeddings scaled by √d_model, the target
embedding tied to the output projection by default. Greedy decoding without a cache
(re-runs the decoder on the prefix each step; fine for short sentences).

Masks follow one convention: bool, True at real tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from anact.experiments.models.textrcnn import apply_activation

__all__ = ["FeedForward", "Seq2SeqTransformer"]

ActFactory = Callable[[], nn.Module]


class FeedForward(nn.Module):
    """Linear(d, ff) – activation (masked) – dropout – Linear(ff, d).

    Shape: (N, L, d), mask bool (N, L) or ``None`` → (N, L, d).
    """

    def __init__(self, d_model: int, dim_ff: int, activation: ActFactory, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.act = activation()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_ff, d_model)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.linear2(self.dropout(apply_activation(self.act, self.linear1(x), mask)))


class _EncoderLayer(nn.Module):
    def __init__(self, d: int, nhead: int, ff: int, act: ActFactory, dropout: float, pre_ln: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout, batch_first=True)
        self.ff = FeedForward(d, ff, act, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.pre_ln = pre_ln

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        def sa(h: Tensor) -> Tensor:
            return self.self_attn(h, h, h, key_padding_mask=~mask, need_weights=False)[0]

        if self.pre_ln:
            x = x + self.drop(sa(self.norm1(x)))
            return x + self.drop(self.ff(self.norm2(x), mask))
        x = self.norm1(x + self.drop(sa(x)))
        return self.norm2(x + self.drop(self.ff(x, mask)))


class _DecoderLayer(nn.Module):
    def __init__(self, d: int, nhead: int, ff: int, act: ActFactory, dropout: float, pre_ln: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, nhead, dropout=dropout, batch_first=True)
        self.ff = FeedForward(d, ff, act, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.pre_ln = pre_ln

    def forward(
        self, y: Tensor, memory: Tensor, tgt_mask: Tensor, src_mask: Tensor, causal: Tensor
    ) -> Tensor:
        def sa(h: Tensor) -> Tensor:
            return self.self_attn(
                h, h, h, attn_mask=causal, key_padding_mask=~tgt_mask, need_weights=False
            )[0]

        def ca(h: Tensor) -> Tensor:
            return self.cross_attn(
                h, memory, memory, key_padding_mask=~src_mask, need_weights=False
            )[0]

        if self.pre_ln:
            y = y + self.drop(sa(self.norm1(y)))
            y = y + self.drop(ca(self.norm2(y)))
            return y + self.drop(self.ff(self.norm3(y), tgt_mask))
        y = self.norm1(y + self.drop(sa(y)))
        y = self.norm2(y + self.drop(ca(y)))
        return self.norm3(y + self.drop(self.ff(y, tgt_mask)))


def _sinusoids(max_len: int, d: int) -> Tensor:
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(max_len, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d // 2])
    return pe


class Seq2SeqTransformer(nn.Module):
    """Encoder–decoder Transformer with an injected feed-forward activation.

    Args:
        activation: factory of the feed-forward activation (one per layer).
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_ff, dropout:
            the usual sizes (defaults: a small model, 256/4/3/3/1024/0.1).
        pre_ln: LayerNorm before each sublayer (default) or after (post-LN).
        max_len: longest sequence the positional table covers.
        pad_id: padding id of both vocabularies (masks default to ``ids != pad_id``).
        tie_embeddings: share the target embedding with the output projection.

    Shape: ``forward(src (N, S), tgt_in (N, T))`` → logits (N, T, tgt_vocab_size).
    """

    def __init__(
        self,
        activation: ActFactory,
        src_vocab_size: int,
        tgt_vocab_size: int,
        *,
        d_model: int = 256,
        nhead: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 3,
        dim_ff: int = 1024,
        dropout: float = 0.1,
        pre_ln: bool = True,
        max_len: int = 256,
        pad_id: int = 0,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        self.d_model, self.pad_id, self.pre_ln = d_model, pad_id, pre_ln
        self.src_embed = nn.Embedding(src_vocab_size, d_model, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model, padding_idx=pad_id)
        self.register_buffer("pe", _sinusoids(max_len, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        args = (d_model, nhead, dim_ff, activation, dropout, pre_ln)
        self.encoder = nn.ModuleList(_EncoderLayer(*args) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(_DecoderLayer(*args) for _ in range(num_decoder_layers))
        self.enc_norm = nn.LayerNorm(d_model) if pre_ln else nn.Identity()
        self.dec_norm = nn.LayerNorm(d_model) if pre_ln else nn.Identity()
        self.out = nn.Linear(d_model, tgt_vocab_size)
        nn.init.normal_(self.src_embed.weight, std=d_model**-0.5)
        nn.init.normal_(self.tgt_embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.src_embed.weight[pad_id].zero_()
            self.tgt_embed.weight[pad_id].zero_()
        if tie_embeddings:
            self.out.weight = self.tgt_embed.weight

    def _embed(self, emb: nn.Embedding, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.pe.shape[0]:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len={self.pe.shape[0]}")
        return self.drop(emb(ids) * math.sqrt(self.d_model) + self.pe[: ids.shape[1]])

    def _mask(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        mask = ids != self.pad_id if mask is None else mask.bool()
        if mask.shape != ids.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match ids {tuple(ids.shape)}")
        return mask

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Source ids (N, S) → memory (N, S, d_model) and the source mask (N, S)."""
        src_mask = self._mask(src, src_mask)
        if bool((~src_mask).all(dim=1).any()):
            raise ValueError("every source sentence needs at least one real token")
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return self.enc_norm(x), src_mask

    def _decode_hidden(
        self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor, tgt_mask: Tensor | None
    ) -> Tensor:
        tgt_mask = self._mask(tgt_in, tgt_mask)
        t = tgt_in.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt_in.device).triu(1)
        y = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            y = layer(y, memory, tgt_mask, src_mask, causal)
        return self.dec_norm(y)

    def decode(
        self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor, tgt_mask: Tensor | None = None
    ) -> Tensor:
        """Target prefix ids (N, T) (starting with ``<bos>``) → logits (N, T, V)."""
        return self.out(self._decode_hidden(tgt_in, memory, src_mask, tgt_mask))

    def forward(
        self,
        src: Tensor,
        tgt_in: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
    ) -> Tensor:
        memory, src_mask = self.encode(src, src_mask)
        return self.decode(tgt_in, memory, src_mask, tgt_mask)

    @torch.no_grad()
    def greedy_decode(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        *,
        bos_id: int = 2,
        eos_id: int = 3,
        max_len: int = 60,
    ) -> Tensor:
        """Greedy translation of ``src`` (N, S): ids (N, ≤ max_len) without ``<bos>``,
        each row ending at its first ``<eos>`` and padded with ``pad_id`` after it.

        Runs in the module's current mode; call ``model.eval()`` first (so normalized
        activations use their running statistics and dropout is off).
        """
        memory, src_mask = self.encode(src, src_mask)
        n = src.shape[0]
        ys = torch.full((n, 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(n, dtype=torch.bool, device=src.device)
        max_len = min(max_len, self.pe.shape[0] - 1)
        for _ in range(max_len):
            hidden = self._decode_hidden(
                ys, memory, src_mask, torch.ones_like(ys, dtype=torch.bool)
            )
            nxt = self.out(hidden[:, -1]).argmax(-1)  # only the last position is needed
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            ys = torch.cat([ys, nxt.unsqueeze(1)], dim=1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        return ys[:, 1:]
