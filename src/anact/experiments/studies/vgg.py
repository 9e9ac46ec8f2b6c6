"""Paper Tables 2 and 3 (§3.2): VGG19 on CIFAR-100, with BN ("vgg") and without ("vgg-nobn").

The paper: CIFAR-100, 200 epochs, AdamW with the same learning rate for all, 3 runs
(median); Xavier init for Tanh and the normalized activations, He for the others,
orthogonal for GPN. With BN, BN before a normalized activation has no affine and the
top three activations of a normalized network are its unnormalized counterpart
(§3.2). Without BN, SELU and the GPNs were trained with SGD (lr 0.01, ×0.2 every
60 epochs) as AdamW did not converge for them.

Here the default data is Fashion-MNIST padded to 3×32×32 (CIFAR is not packaged;
pass ``--dataset cifar100 --data-dir DIR`` for the real thing) and a thin VGG19
(widths / 8, hidden 256) on 5,000 images for 3 epochs: minutes on a 2-core CPU.
``--paper``: CIFAR-100 (``data_dir`` needed), full width, 200 epochs, 3 runs,
random-crop + flip augmentation. The learning rate, weight decay and batch size are
not given in the paper; the presets use AdamW lr 1e-3, weight decay 5e-4, batch 128.

This module also holds the image-study helpers shared with ``resnet`` and
``layeract``: :func:`load_images`, :func:`image_trial`, :func:`make_paper_activation`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import anact
from anact.experiments import paper
from anact.experiments.data import ImageData
from anact.experiments.data.cifar import fashion_mnist_as_cifar, load_cifar
from anact.experiments.data.idx import DataError
from anact.experiments.data.tiny_imagenet import load_tiny_imagenet
from anact.experiments.models import ACTIVATIONS, init_weights
from anact.experiments.models.vgg import VGG
from anact.experiments.studies import Study, Trial, register

__all__ = [
    "IMAGE_DEFAULTS",
    "IMAGE_PAPER",
    "STUDY",
    "STUDY_NOBN",
    "build",
    "image_trial",
    "load_images",
    "make_paper_activation",
    "random_crop_flip",
]

EVAL_BATCH = 500
IMAGE_DATASETS = ("fashion-mnist", "cifar10", "cifar100", "tiny-imagenet")


def load_images(config: dict[str, Any], device: torch.device) -> ImageData:
    """``config["dataset"]`` as float (N, 3, H, W) standardised images on ``device``.

    ``fashion-mnist`` (Debian ``dataset-fashion-mnist``, padded to 32×32, 3 channels),
    ``cifar10``/``cifar100`` (python pickles in ``data_dir``), ``tiny-imagenet``
    (``data_dir``; ``train_subset`` becomes a per-class count). ``train_subset``
    keeps the first N training images.
    """
    name, data_dir, subset = config["dataset"], config.get("data_dir"), config.get("train_subset")
    if name == "fashion-mnist":
        return fashion_mnist_as_cifar(data_dir, device=device, train_subset=subset)
    if name in ("cifar10", "cifar100", "tiny-imagenet") and data_dir is None:
        raise DataError(f"dataset {name!r} is not packaged: pass its folder with --data-dir")
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir, device=device, train_subset=subset)
    if name == "tiny-imagenet":
        per_class = None if subset is None else max(1, math.ceil(subset / 200))
        return load_tiny_imagenet(data_dir, device=device, per_class=per_class)
    raise DataError(f"unknown image dataset {name!r}; choose one of {', '.join(IMAGE_DATASETS)}")


def make_paper_activation(name: str, center: bool = True) -> tuple[Callable[[], nn.Module], Any]:
    """``(factory, spec)`` of a paper activation; normalized ones get ``center``
    (μ enabled by default here, unlike the LeNet5 study)."""
    spec = ACTIVATIONS[name]
    if spec.family == "normalized":
        return (lambda: spec.factory(center=center)), spec
    return spec.factory, spec


def plain_counterpart(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module] | None:
    """The unnormalized torch module of a normalized activation factory, else None."""
    probe = factory()
    if isinstance(probe, anact.NormalizedActivation):
        return probe.activation.module
    return None


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel translation (zero padding) and horizontal flip per image,
    drawing from ``gen`` (CPU). x (N, C, H, W) → same shape."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    di = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dj = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    rows = (di[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dj[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    ar_n = torch.arange(n, device=x.device)[:, None, None, None]
    ar_c = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[ar_n, ar_c, rows, cols]


def make_optimizer(config: dict[str, Any], model: nn.Module, activation: str):
    """AdamW (``lr``, ``weight_decay``), or SGD with step decay for the activations in
    ``sgd_activations`` (paper §3.2: SELU and GPN without BN)."""
    if activation in config.get("sgd_activations", ()):
        opt = torch.optim.SGD(
            model.parameters(),
            lr=config["sgd_lr"],
            momentum=0.9,
            weight_decay=config["weight_decay"],
        )
        step = max(1, round(config["epochs"] * 60 / 200))  # ×0.2 every 60 of 200 epochs
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=0.2)
    opt = torch.optim.AdamW(
        model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    return opt, None


def image_trial(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ImageData,
    config: dict[str, Any],
    scheduler: Any = None,
    evaluate_extra: Callable[[nn.Module], dict[str, float]] | None = None,
) -> Trial:
    """The shared training loop: shuffled mini-batches (``batch_size``), optional
    augmentation (``augment``), cross-entropy; evaluation top-1 and top-5 (percent)."""
    x, y = data.train_x, data.train_y
    n, bs = x.shape[0], int(config["batch_size"])
    augment = bool(config.get("augment", False))

    def train_epoch(order: torch.Generator, after_step) -> float:
        model.train()
        perm = torch.randperm(n, generator=order).to(x.device)
        total = torch.zeros((), device=x.device)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            if idx.numel() < 2:  # BatchNorm needs two samples
                continue
            xb = random_crop_flip(x[idx], order) if augment else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            after_step()
            total += loss.detach() * idx.numel()
        if scheduler is not None:
            scheduler.step()
        return float(total) / n

    @torch.no_grad()
    def evaluate() -> dict[str, float | None]:
        model.eval()
        vx, vy = data.val_x, data.val_y
        top1 = top5 = 0
        for i in range(0, vx.shape[0], EVAL_BATCH):
            logits, t = model(vx[i : i + EVAL_BATCH]), vy[i : i + EVAL_BATCH]
            top1 += int((logits.argmax(1) == t).sum())
            k = min(5, logits.shape[1])
            top5 += int((logits.topk(k, 1).indices == t[:, None]).any(1).sum())
        out: dict[str, float | None] = {
            "val_acc": 100.0 * top1 / vx.shape[0],
            "val_acc_top5": 100.0 * top5 / vx.shape[0] if data.num_classes > 5 else None,
        }
        if evaluate_extra is not None:
            out.update(evaluate_extra(model))
        return out

    return Trial(model, optimizer, train_epoch, evaluate, scheduler=scheduler)


def build(
    config: dict[str, Any], activation: str, seed: int, data: ImageData, device: torch.device
) -> Trial:
    """VGG with ``activation`` (paper init); normalized: BN without affine before it,
    the top ``top_plain`` activations unnormalized (§3.2)."""
    factory, spec = make_paper_activation(activation, config["center"])
    top = plain_counterpart(factory) if config["top_plain"] else None
    model = VGG(
        factory, config["config"], data.num_classes, data.train_x.shape[1],
        batch_norm=config["batch_norm"], top_activation=top, num_top=config["top_plain"],
        buffer_bn=config["buffer_bn"], hidden=config["hidden"], width_div=config["width_div"],
    )  # fmt: skip
    init_weights(model, spec.init, spec.he_nonlinearity).to(device)
    opt, sched = make_optimizer(config, model, activation)
    return image_trial(model, opt, data, config, sched)


#: quick image-study settings shared by the vgg and resnet studies (CPU-sized)
IMAGE_DEFAULTS = {
    "dataset": "fashion-mnist",
    "data_dir": None,
    "runs": 1,
    "epochs": 3,
    "seed": 0,
    "train_subset": 5000,
    "batch_size": 128,
    "lr": 1e-3,
    "weight_decay": 5e-4,
    "sgd_lr": 0.01,
    "sgd_activations": [],
    "augment": False,
}
#: the paper's image protocol: CIFAR-100, 3 runs × 200 epochs, full data, augmentation
IMAGE_PAPER = {
    "dataset": "cifar100",
    "runs": 3,
    "epochs": 200,
    "train_subset": None,
    "augment": True,
}

_DEFAULTS = {
    **IMAGE_DEFAULTS,
    "config": "vgg19",
    "width_div": 8,
    "hidden": 256,
    "batch_norm": True,
    "top_plain": 3,
    "buffer_bn": False,
    "center": True,
}
_PAPER = {
    **IMAGE_PAPER,
    "width_div": 1,
    "hidden": 4096,
}

STUDY = register(
    Study(
        name="vgg",
        title="VGG19 with BN, AdamW: top-1 / top-5 validation accuracy (paper Table 2)",
        model="vgg19",
        defaults=_DEFAULTS,
        paper_preset=_PAPER,
        activations=("tanh", "lrelu", "elu", "relu", "nrelu", "swish", "nswish"),
        load_data=load_images,
        build=build,
        datasets=IMAGE_DATASETS,
        paper=paper.TABLE2,
        paper_caption=(
            "Paper: VGG19 with BN on CIFAR-100, 200 epochs, AdamW, median of 3 runs "
            "(Table 2 of arXiv:2208.13315)."
        ),
    )
)

STUDY_NOBN = register(
    Study(
        name="vgg-nobn",
        title="VGG19 without BN: top-1 / top-5 validation accuracy (paper Table 3)",
        model="vgg19-nobn",
        defaults={
            **_DEFAULTS,
            "batch_norm": False,
            "top_plain": 0,
            "sgd_activations": ["selu", "relu-gpn", "lrelu-gpn"],
        },
        paper_preset=_PAPER,
        activations=("selu", "relu-gpn", "nrelu", "lrelu-gpn", "nlrelu", "nswish"),
        load_data=load_images,
        build=build,
        datasets=IMAGE_DATASETS,
        paper=paper.TABLE3,
        paper_caption=(
            "Paper: VGG19 without BN on CIFAR-100, 200 epochs; SELU and GPN with SGD "
            "(lr 0.01, ×0.2 every 60 epochs), the others AdamW; 3 runs (Table 3)."
        ),
    )
)
