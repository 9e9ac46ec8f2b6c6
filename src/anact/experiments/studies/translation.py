"""German→English translation with a small Transformer whose feed-forward activation
is compared (the v3 paper's IWSLT experiment; no numbers of it are in our copy).

The feed-forward activations of every encoder and decoder layer are the compared
activation; normalized ones get the padding mask (statistics over real tokens only).
Training: teacher forcing, label smoothing, Adam (β₂ 0.98), gradient clipping.
Evaluation: greedy decoding of the validation split and corpus BLEU
(:func:`anact.experiments.bleu.bleu`: SacreBLEU when installed, else the built-in
implementation, same numbers; tokenisation "none" on the lower-cased word tokens).
**The store's ``val_acc`` column holds BLEU (0–100) for this study**; ``val_acc_top5``
is left empty.

Defaults (a smoke test sized for a 2-core CPU; BLEU stays about 1): the first 6,000
training pairs of the example sentences of the Debian dictionary ``trans-de-en``
(about 17,000 pairs, fixed 90/5/5 split), a 2+2-layer model of width 64, 3 epochs,
BLEU on the first 200 validation sentences; ``--train-subset 0 --epochs 30``
for a real comparison. ``--paper``: IWSLT'14 de-en files in ``data_dir``
(``train.de``/``train.en``, ``valid.*``, ``test.*``), 6+6 layers of width 512
(ff 1024, 4 heads; the usual IWSLT setting), 30 epochs, 3 runs, full validation set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from anact.experiments.bleu import bleu
from anact.experiments.data.text import PAD
from anact.experiments.data.translation import (
    BOS,
    EOS,
    TranslationData,
    load_translation_dataset,
)
from anact.experiments.models import init_weights
from anact.experiments.models.transformer import Seq2SeqTransformer
from anact.experiments.studies import Study, Trial, register
from anact.experiments.studies.vgg import make_paper_activation

__all__ = ["STUDY", "build", "load_data"]

EVAL_BATCH = 100


def load_data(config: dict[str, Any], device: torch.device) -> TranslationData:
    """The pairs of ``config["dataset"]`` (see :mod:`..data.translation`)."""
    return load_translation_dataset(
        config["dataset"], config.get("data_dir"), min_freq=config["min_freq"],
        max_size=config["max_vocab"], max_len=config["max_len"],
        train_subset=config.get("train_subset"), device=device,
    )  # fmt: skip


def build(
    config: dict[str, Any], activation: str, seed: int, data: TranslationData, device: torch.device
) -> Trial:
    """Seq2SeqTransformer with ``activation`` in the feed-forward blocks, Adam."""
    factory, spec = make_paper_activation(activation, config["center"])
    model = Seq2SeqTransformer(
        factory, len(data.src_vocab), len(data.tgt_vocab), d_model=config["d_model"],
        nhead=config["nhead"], num_encoder_layers=config["layers"],
        num_decoder_layers=config["layers"], dim_ff=config["dim_ff"],
        dropout=config["dropout"], pre_ln=config["pre_ln"], max_len=config["max_len"] + 2,
    )  # fmt: skip
    # paper init on the linear layers (the tied embedding keeps its own init)
    emb = model.tgt_embed.weight.detach().clone()
    init_weights(model, spec.init, spec.he_nonlinearity)
    with torch.no_grad():
        model.tgt_embed.weight.copy_(emb)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"], betas=(0.9, 0.98))
    train, n, bs = data.train, len(data.train), int(config["batch_size"])
    n_eval = min(len(data.valid), config["eval_subset"] or len(data.valid))

    def train_epoch(order: torch.Generator, after_step) -> float:
        model.train()
        perm = torch.randperm(n, generator=order).to(train.src.ids.device)
        total = torch.zeros((), device=train.src.ids.device)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            s_w, t_w = int(train.src.lengths[idx].max()), int(train.tgt.lengths[idx].max())
            src, tgt = train.src.ids[idx, :s_w], train.tgt.ids[idx, :t_w]
            logits = model(src, tgt[:, :-1])
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1),
                ignore_index=PAD, label_smoothing=config["label_smoothing"],
            )  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["clip"])
            opt.step()
            after_step()
            total += loss.detach() * idx.numel()
        return float(total) / n

    @torch.no_grad()
    def evaluate() -> dict[str, float | None]:
        model.eval()
        hyps: list[str] = []
        v = data.valid
        for i in range(0, n_eval, EVAL_BATCH):
            j = min(i + EVAL_BATCH, n_eval)
            w = int(v.src.lengths[i:j].max())
            out = model.greedy_decode(
                v.src.ids[i:j, :w], bos_id=BOS, eos_id=EOS, max_len=config["max_len"]
            )
            hyps += [data.detokenize(row) for row in out]
        score = bleu(hyps, v.refs[:n_eval], tokenize="none")
        return {"val_acc": score, "val_acc_top5": None}

    return Trial(model, opt, train_epoch, evaluate)


STUDY = register(
    Study(
        name="translation",
        title="Transformer de→en, FFN activation compared: validation BLEU (in val_acc)",
        model="transformer",
        metric="bleu",
        validation="greedy decoding of the fixed validation split (`eval_subset` sentences)",
        defaults={
            "dataset": "trans-de-en",
            "data_dir": None,
            "runs": 1,
            "epochs": 3,
            "seed": 0,
            "train_subset": 6000,
            "min_freq": 2,
            "max_vocab": 5000,
            "max_len": 30,
            "batch_size": 32,
            "lr": 2e-3,
            "clip": 1.0,
            "label_smoothing": 0.1,
            "d_model": 64,
            "nhead": 4,
            "layers": 2,
            "dim_ff": 128,
            "dropout": 0.1,
            "pre_ln": True,
            "center": True,
            "eval_subset": 200,
        },
        paper_preset={
            "dataset": "iwslt",
            "runs": 3,
            "epochs": 30,
            "train_subset": None,
            "min_freq": 3,
            "max_vocab": 40000,
            "max_len": 100,
            "batch_size": 64,
            "lr": 5e-4,
            "d_model": 512,
            "layers": 6,
            "dim_ff": 1024,
            "dropout": 0.3,
            "eval_subset": None,
        },
        activations=("relu", "nrelu", "swish", "nswish"),
        load_data=load_data,
        build=build,
        datasets=("trans-de-en", "iwslt"),
        paper_caption=(
            "The v3 paper (2024) adds IWSLT translation experiments; their numbers are "
            "not in our copy of the paper, so no paper column."
        ),
    )
)
