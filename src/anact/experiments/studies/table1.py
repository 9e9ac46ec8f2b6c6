"""Paper Table 1 (§3.1): LeNet5 with each activation, plain SGD, N runs × E epochs.

The paper: MNIST, 25 runs × 50 epochs, the same learning rate for all; the init
each activation is paired with (Xavier / He / orthogonal, see
:data:`anact.experiments.models.ACTIVATIONS`); μ disabled in normalized activations.
Here the default data set is Fashion-MNIST (MNIST is 98-99 % for every activation
and is not packaged); the validation set is the official test split.

Defaults are sized for ~10 minutes on a 2-core CPU (see docs/results.md): 9
activations × 3 runs × 5 epochs on the first 10 000 training images, plain SGD
(lr 0.05, batch 64; the paper gives no learning rate). At lr 0.05 NReLU, whose
scales λ reach 2-4 in LeNet5, diverged in 2 of 3 runs on this machine, and at
lr 0.02 it beat ReLU (docs/results.md): the learning rate is the setting to vary.
``--paper``: 25 runs × 50 epochs on the full training set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from anact.experiments import paper
from anact.experiments.data import ImageData, load_image_dataset
from anact.experiments.models import ACTIVATIONS, LeNet5, init_weights
from anact.experiments.studies import EnsembleSpec, Study, Trial, register

__all__ = ["STUDY", "build", "epoch_batches", "load_data", "threshold"]


def threshold(config: Mapping[str, Any]) -> float:
    """Accuracy (%) of the "runs under threshold until epoch i" columns.

    MNIST: the paper's 98 %. Fashion-MNIST, full training set (``--paper``): 88 %,
    which LeNet5 passes after some epochs with every sound activation but not in the
    first ones (it ends near 90 %), so the columns count slow starters as the paper's
    do. Fashion-MNIST on a training subset (the default): 80 %, the level the
    default 5 epochs on 10 000 images reach (docs/results.md); 88 % would count every
    run of every activation and tell nothing.
    """
    if config.get("dataset") == "mnist":
        return 98.0
    return 88.0 if config.get("train_subset") is None else 80.0


EVAL_BATCH = 1000


def epoch_batches(
    order: torch.Generator, n: int, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """One epoch's training batches (index tensors on ``device``): a permutation of
    range(n) drawn from ``order``, cut into batches of ``batch_size`` (the last may be
    smaller). Sequential runs and ensemble members both draw their batches here."""
    return torch.randperm(n, generator=order).to(device).split(batch_size)


def load_data(config: dict[str, Any], device: torch.device) -> ImageData:
    """The IDX data set of ``config["dataset"]`` on ``device`` (see :mod:`..data.idx`)."""
    return load_image_dataset(
        config["dataset"], config.get("data_dir"), device=device,
        train_subset=config.get("train_subset"),
    )  # fmt: skip


def build(
    config: dict[str, Any], activation: str, seed: int, data: ImageData, device: torch.device
) -> Trial:
    """LeNet5 with ``activation`` and its paper init, plain SGD (lr, momentum)."""
    spec = ACTIVATIONS[activation]
    model = LeNet5(spec.factory, num_classes=data.num_classes)
    init_weights(model, spec.init, spec.he_nonlinearity).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
    x, y = data.train_x, data.train_y
    n, bs = x.shape[0], int(config["batch_size"])

    def train_epoch(order: torch.Generator, after_step) -> float:
        model.train()
        total = torch.zeros((), device=x.device)
        for idx in epoch_batches(order, n, bs, x.device):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            after_step()
            total += loss.detach() * idx.numel()
        return float(total) / n

    @torch.no_grad()
    def evaluate() -> dict[str, float | None]:
        model.eval()
        vx, vy = data.val_x, data.val_y
        correct = torch.zeros((), dtype=torch.long, device=vx.device)
        for i in range(0, vx.shape[0], EVAL_BATCH):
            correct += (model(vx[i : i + EVAL_BATCH]).argmax(1) == vy[i : i + EVAL_BATCH]).sum()
        return {"val_acc": 100.0 * int(correct) / vx.shape[0], "val_acc_top5": None}

    return Trial(model, opt, train_epoch, evaluate)


STUDY = register(
    Study(
        name="table1",
        title="LeNet5, SGD: best validation accuracy and runs under a threshold (paper Table 1)",
        model="lenet5",
        defaults={
            "dataset": "fashion-mnist",
            "data_dir": None,
            "runs": 3,
            "epochs": 5,
            "seed": 0,
            "batch_size": 64,
            "lr": 0.05,
            "momentum": 0.0,
            "train_subset": 10000,
        },
        paper_preset={"runs": 25, "epochs": 50, "train_subset": None},
        activations=("tanh", "lrelu", "elu", "selu", "relu", "relu-gpn", "nrelu", "swish",
                     "nswish"),  # fmt: skip
        load_data=load_data,
        build=build,
        datasets=("fashion-mnist", "mnist"),
        paper=paper.TABLE1,
        paper_caption=(
            "Paper: MNIST, 25 runs × 50 epochs, 'under' = runs below 98 % until epoch "
            "5/10/15/30/50 (Table 1 of arXiv:2208.13315)."
        ),
        threshold=threshold,
        threshold_epochs=None,
        ensemble=EnsembleSpec(
            train_set=lambda data: (data.train_x, data.train_y),
            val_set=lambda data: (data.val_x, data.val_y),
            batches=lambda config, data, order: epoch_batches(
                order, data.train_x.shape[0], int(config["batch_size"]), data.train_x.device
            ),
            loss=F.cross_entropy,
            eval_batch=EVAL_BATCH,
        ),
    )
)
