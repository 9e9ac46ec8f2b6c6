"""Paper Tables 4 and 5 (§3.3): ResNet50 on CIFAR-100 ("resnet") and Tiny ImageNet
("resnet-tiny").

Unnormalized activations use torchvision's Bottleneck (one activation module used
three times); normalized ones the paper's Figure 6 block: normalized activations
after bn1 and bn2 (BN without affine), the unnormalized counterpart after the
addition, and a normalized stem (23,690,053 parameters instead of 23,705,252 with
100 classes). The paper follows "the same set up" as VGG (AdamW, same learning rate)
for a fixed number of epochs, which it does not state; the preset uses 200.

Defaults (both studies, so resnet-tiny's quick run is resnet's under another name):
Fashion-MNIST padded to 3×32×32, a thin ResNet ([1, 1, 1, 1] blocks, base width 8) on
5,000 images for 3 epochs; Tiny ImageNet needs ``--dataset tiny-imagenet --data-dir``.
``--paper``: ResNet50 ([3, 4, 6, 3], width 64) on CIFAR-100 (resp. Tiny ImageNet at
64×64, with the CIFAR stem as well), ``data_dir`` needed, crop + flip augmentation, 3 runs.
"""

from __future__ import annotations

from typing import Any

import torch

from anact.experiments import paper
from anact.experiments.data import ImageData
from anact.experiments.models import init_weights
from anact.experiments.models.resnet import ResNet
from anact.experiments.studies import Study, Trial, register
from anact.experiments.studies.vgg import (
    IMAGE_DATASETS,
    IMAGE_DEFAULTS,
    IMAGE_PAPER,
    image_trial,
    load_images,
    make_optimizer,
    make_paper_activation,
    plain_counterpart,
)

__all__ = ["STUDY", "STUDY_TINY", "build"]


def build(
    config: dict[str, Any], activation: str, seed: int, data: ImageData, device: torch.device
) -> Trial:
    """ResNet with ``activation``: Figure 6 blocks for normalized activations."""
    factory, spec = make_paper_activation(activation, config["center"])
    post = plain_counterpart(factory)
    model = ResNet(
        factory, config["layers"], data.num_classes, data.train_x.shape[1],
        block="normalized" if post is not None else "plain", post_activation=post,
        stem=config["stem"], base_width=config["base_width"],
    )  # fmt: skip
    init_weights(model, spec.init, spec.he_nonlinearity).to(device)
    opt, sched = make_optimizer(config, model, activation)
    return image_trial(model, opt, data, config, sched)


_DEFAULTS = {
    **IMAGE_DEFAULTS,
    "layers": [1, 1, 1, 1],
    "base_width": 8,
    "stem": "cifar",
    "center": True,
}
_PAPER = {
    **IMAGE_PAPER,
    "layers": [3, 4, 6, 3],
    "base_width": 64,
}
_ACTS = ("tanh", "lrelu", "elu", "selu", "relu", "nrelu", "swish", "nswish")

STUDY = register(
    Study(
        name="resnet",
        title="ResNet50 (Figure 6 blocks), AdamW: top-1 / top-5 validation accuracy (Table 4)",
        model="resnet50",
        defaults=_DEFAULTS,
        paper_preset=_PAPER,
        activations=_ACTS,
        load_data=load_images,
        build=build,
        datasets=IMAGE_DATASETS,
        paper=paper.TABLE4,
        paper_caption="Paper: ResNet50 on CIFAR-100, the 3 runs (Table 4 of arXiv:2208.13315).",
    )
)

STUDY_TINY = register(
    Study(
        name="resnet-tiny",
        title="ResNet50 on Tiny ImageNet: top-1 / top-5 validation accuracy (Table 5)",
        model="resnet50",
        defaults=_DEFAULTS,
        paper_preset={**_PAPER, "dataset": "tiny-imagenet"},
        activations=_ACTS,
        load_data=load_images,
        build=build,
        datasets=IMAGE_DATASETS,
        paper=paper.TABLE5,
        paper_caption=(
            "Paper: ResNet50 on Tiny ImageNet, median of 3 runs (Table 5 of arXiv:2208.13315)."
        ),
    )
)
