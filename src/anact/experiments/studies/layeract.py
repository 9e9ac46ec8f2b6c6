"""LayerAct robustness study: CIFAR ResNet with element-level vs layer-level
activations, clean and corrupted (CIFAR-C style) test accuracy.

After Kim et al. (LayerAct, arXiv:2306.04940; see docs on LA-SiLU / LA-HardSiLU):
ResNet-32 on CIFAR-10 with BN, ReLU / SiLU / HardSiLU against LA-SiLU / LA-HardSiLU
(and NSwish from ANAct), accuracy on the clean test set and on corrupted copies
(:mod:`anact.experiments.data.corruptions`, generated deterministically from the
clean test set). Their early numbers (CIFAR-10, ResNet-32, mean top-1): ReLU 91.79,
SiLU 91.96, LA-SiLU 92.30, LA-HardSiLU 91.84.

Metrics per epoch: ``val_acc`` is the clean top-1 on the full test set; the
evaluation also returns ``corrupt_acc`` (mean top-1 over every corruption × severity
on the first ``corrupt_subset`` test images), ``corrupt_acc/<name>`` (mean over
severities) and ``corrupt_clean_acc``, the clean top-1 on those same images: the
report's "drop" is ``corrupt_clean_acc − corrupt_acc``, measured on one set of images.

Defaults: Fashion-MNIST padded to 3×32×32, ResNet-8 on 5,000 images, 3 epochs,
6 corruptions × 5 severities on 500 test images. ``--paper``: CIFAR-10
(``data_dir`` needed), ResNet-32, 180 epochs of SGD (lr 0.1, ×0.1 at 50 % and 75 %),
crop + flip, all 10 corruptions on the full test set, 3 runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import anact
from anact.experiments.data import ImageData, read_idx_dataset
from anact.experiments.data.cifar import channel_stats, load_cifar, standardize, to_cifar_shape
from anact.experiments.data.corruptions import CORRUPTIONS, corrupted_sets
from anact.experiments.data.idx import DataError
from anact.experiments.data.tiny_imagenet import load_tiny_imagenet
from anact.experiments.models import init_weights
from anact.experiments.models.resnet import CifarResNet
from anact.experiments.studies import Study, Trial, register
from anact.experiments.studies.vgg import image_trial

__all__ = ["ACTIVATIONS", "STUDY", "LayerActData", "build", "load_data"]

#: the activations of this study: name → (factory, init scheme)
ACTIVATIONS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "relu": (nn.ReLU, "he"),
    "swish": (nn.SiLU, "he"),
    "hardswish": (nn.Hardswish, "he"),
    "la-silu": (anact.LASiLU, "he"),
    "la-hardsilu": (anact.LAHardSiLU, "he"),
    "nswish": (anact.NSwish, "xavier"),
}

EVAL_BATCH = 500


@dataclass
class LayerActData:
    """Standardised ``images`` plus the raw [0, 1] test images to corrupt and the
    training ``mean``/``std`` (C,) that standardise them."""

    images: ImageData
    raw_val: Tensor
    mean: Tensor
    std: Tensor


def _raw_fashion_mnist(data_dir: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tx, ty, vx, vy = read_idx_dataset("fashion-mnist", data_dir)
    return (
        to_cifar_shape(tx, pad_value=0.0),
        ty.long(),
        to_cifar_shape(vx, pad_value=0.0),
        vy.long(),
    )


def load_data(config: dict[str, Any], device: torch.device) -> LayerActData:
    """Images in [0, 1] from ``config["dataset"]``, standardised per channel with the
    training statistics; the raw test images are kept for the corruptions."""
    name, data_dir, subset = config["dataset"], config.get("data_dir"), config.get("train_subset")
    if name == "fashion-mnist":
        tx, ty, vx, vy = _raw_fashion_mnist(data_dir)
        num_classes = 10
    elif name in ("cifar10", "cifar100", "tiny-imagenet"):
        if data_dir is None:
            raise DataError(f"dataset {name!r} is not packaged: pass its folder with --data-dir")
        if name == "tiny-imagenet":
            d = load_tiny_imagenet(data_dir, standardized=False)
        else:
            d = load_cifar(name, data_dir, standardized=False)
        tx, ty, vx, vy, num_classes = d.train_x, d.train_y, d.val_x, d.val_y, d.num_classes
    else:
        raise DataError(
            f"unknown dataset {name!r} for layeract; choose fashion-mnist, cifar10, cifar100 "
            "or tiny-imagenet"
        )
    if subset is not None:
        tx, ty = tx[:subset], ty[:subset]
    tx, vx = tx.to(device), vx.to(device)
    mean, std = channel_stats(tx)
    images = ImageData(
        name=name,
        train_x=standardize(tx, mean, std),
        train_y=ty.to(device),
        val_x=standardize(vx, mean, std),
        val_y=vy.to(device),
        num_classes=num_classes,
    )
    n_c = config.get("corrupt_subset")
    return LayerActData(images, vx[:n_c] if n_c else vx, mean, std)


def build(
    config: dict[str, Any], activation: str, seed: int, data: LayerActData, device: torch.device
) -> Trial:
    """CIFAR ResNet-``depth`` with ``activation``; SGD with step decay."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    factory, init = ACTIVATIONS[activation]
    d = data.images
    model = CifarResNet(factory, config["depth"], d.num_classes, d.train_x.shape[1])
    init_weights(model, init).to(device)  # type: ignore[arg-type]
    opt = torch.optim.SGD(
        model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"]
    )
    e = int(config["epochs"])
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[max(1, e // 2), max(1, 3 * e // 4)], gamma=0.1
    )
    names = list(config["corruptions"] or CORRUPTIONS)
    severities = list(config["severities"])
    labels = d.val_y[: data.raw_val.shape[0]]

    def accuracy(m: nn.Module, xs: Tensor) -> float:
        """Top-1 (%) of ``m`` on standardised images xs, the first of the test set."""
        correct = sum(
            int((m(xs[i : i + EVAL_BATCH]).argmax(1) == labels[i : i + EVAL_BATCH]).sum())
            for i in range(0, xs.shape[0], EVAL_BATCH)
        )
        return 100.0 * correct / xs.shape[0]

    @torch.no_grad()
    def corrupted_accuracy(m: nn.Module) -> dict[str, float]:
        m.eval()
        per: dict[str, list[float]] = {n: [] for n in names}
        for name, _sev, x in corrupted_sets(
            data.raw_val, names, severities, seed=config["corruption_seed"]
        ):
            per[name].append(accuracy(m, standardize(x, data.mean, data.std)))
        out = {f"corrupt_acc/{n}": sum(v) / len(v) for n, v in per.items()}
        out["corrupt_acc"] = sum(out.values()) / len(out)
        out["corrupt_clean_acc"] = accuracy(m, standardize(data.raw_val, data.mean, data.std))
        return out

    return image_trial(model, opt, d, config, sched, evaluate_extra=corrupted_accuracy)


STUDY = register(
    Study(
        name="layeract",
        title="LayerAct robustness: CIFAR ResNet, clean accuracy (+ corrupted accuracy)",
        model="resnet-cifar",
        defaults={
            "dataset": "fashion-mnist",
            "data_dir": None,
            "runs": 1,
            "epochs": 3,
            "seed": 0,
            "train_subset": 5000,
            "batch_size": 128,
            "lr": 0.05,
            "weight_decay": 1e-4,
            "augment": False,
            "depth": 8,
            "corruptions": [
                "gaussian_noise",
                "shot_noise",
                "impulse_noise",
                "gaussian_blur",
                "contrast",
                "brightness",
            ],
            "severities": [1, 2, 3, 4, 5],
            "corrupt_subset": 500,
            "corruption_seed": 0,
        },  # fmt: skip
        paper_preset={
            "dataset": "cifar10",
            "runs": 3,
            "epochs": 180,
            "train_subset": None,
            "lr": 0.1,
            "augment": True,
            "depth": 32,
            "corruptions": None,
            "corrupt_subset": None,
        },
        activations=("relu", "swish", "hardswish", "la-silu", "la-hardsilu", "nswish"),
        load_data=load_data,
        build=build,
        datasets=("fashion-mnist", "cifar10", "cifar100", "tiny-imagenet"),
        paper={
            "relu": {"top1": 91.79},
            "swish": {"top1": 91.96},
            "la-silu": {"top1": 92.30},
            "la-hardsilu": {"top1": 91.84},
        },
        paper_caption=(
            "LayerAct paper (early public results): CIFAR-10, ResNet-32, mean top-1 "
            "on the clean test set."
        ),
    )
)
