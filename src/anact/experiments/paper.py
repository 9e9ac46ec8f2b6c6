"""The paper's published numbers (arXiv:2208.13315 v2), for the reports' "paper" columns.

Keys are the activation names of :data:`anact.experiments.models.ACTIVATIONS`.
Accuracies are percent, as printed; the paper's figures are not included.
"""

from __future__ import annotations

__all__ = [
    "TABLE1",
    "TABLE1_PROTOCOL",
    "TABLE2",
    "TABLE3",
    "TABLE4",
    "TABLE5",
    "IMDB",
    "LAYERACT",
]

#: §3.1: LeNet5, MNIST, SGD (same lr for all), 25 runs × 50 epochs; μ disabled.
TABLE1_PROTOCOL = {
    "dataset": "mnist",
    "runs": 25,
    "epochs": 50,
    "threshold": 98.0,
    "threshold_epochs": (5, 10, 15, 30, 50),
}

#: Table 1: mean / median of the best validation accuracy and the number of the 25
#: runs under 98 % validation accuracy until epoch 5, 10, 15, 30, 50.
TABLE1: dict[str, dict] = {
    name: {
        "mean": mean,
        "median": median,
        "under": dict(zip((5, 10, 15, 30, 50), under, strict=True)),
    }
    for name, mean, median, under in [
        ("tanh", 98.83, 98.83, (25, 9, 0, 0, 0)),
        ("lrelu", 98.87, 98.87, (25, 4, 0, 0, 0)),
        ("elu", 98.90, 98.90, (23, 0, 0, 0, 0)),
        ("selu", 98.90, 98.91, (9, 0, 0, 0, 0)),
        ("relu", 94.42, 98.92, (19, 15, 14, 11, 11)),
        ("relu-gpn", 87.50, 98.91, (14, 7, 6, 5, 5)),
        ("nrelu", 98.95, 98.96, (0, 0, 0, 0, 0)),
        ("swish", 98.86, 98.85, (25, 16, 0, 0, 0)),
        ("nswish", 98.90, 98.90, (1, 0, 0, 0, 0)),
    ]
}

#: Table 2: VGG19 (with BN) on CIFAR-100, median of 3 runs, 200 epochs, AdamW.
TABLE2: dict[str, dict] = {
    "tanh": {"top1": 25.63, "top5": 55.50},
    "lrelu": {"top1": 65.65, "top5": 84.69},
    "elu": {"top1": 59.92, "top5": 85.13},
    "relu": {"top1": 65.65, "top5": 85.50},
    "nrelu": {"top1": 66.11, "top5": 87.13},
    "swish": {"top1": 64.05, "top5": 85.93},
    "nswish": {"top1": 65.72, "top5": 87.40},
}

#: Table 3: VGG19 without BN on CIFAR-100, the 3 runs ordered by top-1.
TABLE3: dict[str, dict] = {
    "selu": {"top1": (64.49, 64.16, 63.83), "top5": (87.28, 87.31, 87.07)},
    "relu-gpn": {"top1": (64.03, 63.78, 63.40), "top5": (86.04, 86.29, 86.31)},
    "nrelu": {"top1": (67.28, 66.31, 66.02), "top5": (87.65, 88.00, 88.15)},
    "lrelu-gpn": {"top1": (64.09, 63.73, 63.28), "top5": (86.03, 85.87, 86.06)},
    "nlrelu": {"top1": (66.33, 66.22, 66.06), "top5": (88.09, 88.42, 87.89)},
    "nswish": {"top1": (64.66, 63.19, 63.15), "top5": (85.49, 85.47, 86.21)},
}

#: Table 4: ResNet50 on CIFAR-100, the 3 runs.
TABLE4: dict[str, dict] = {
    "tanh": {"top1": (61.47, 61.16, 61.25), "top5": (86.41, 85.93, 86.24)},
    "lrelu": {"top1": (71.13, 70.33, 70.01), "top5": (91.40, 90.63, 91.07)},
    "elu": {"top1": (72.10, 71.96, 71.82), "top5": (92.03, 91.89, 91.75)},
    "selu": {"top1": (69.05, 68.80, 68.37), "top5": (90.35, 90.42, 90.42)},
    "relu": {"top1": (70.23, 70.19, 69.90), "top5": (90.98, 91.02, 90.80)},
    "nrelu": {"top1": (71.63, 71.38, 70.99), "top5": (91.72, 91.51, 91.38)},
    "swish": {"top1": (71.71, 71.60, 71.16), "top5": (91.54, 91.51, 91.44)},
    "nswish": {"top1": (73.17, 72.83, 72.72), "top5": (92.15, 92.18, 92.25)},
}

#: Table 5: ResNet50 on Tiny ImageNet, median of 3 runs.
TABLE5: dict[str, dict] = {
    "tanh": {"top1": 40.50, "top5": 66.88},
    "lrelu": {"top1": 54.90, "top5": 78.20},
    "elu": {"top1": 54.06, "top5": 77.67},
    "selu": {"top1": 48.66, "top5": 74.18},
    "relu": {"top1": 54.46, "top5": 77.77},
    "nrelu": {"top1": 56.01, "top5": 78.99},
    "swish": {"top1": 54.93, "top5": 78.39},
    "nswish": {"top1": 56.55, "top5": 79.25},
}

#: §3.4: TextRCNN on IMDB, median validation accuracy of 3 runs (padding masked).
IMDB: dict[str, dict] = {
    "relu": {"top1": 89.0},
    "nrelu": {"top1": 90.2},
    "swish": {"top1": 88.9},
    "nswish": {"top1": 90.1},
}

#: LayerAct (Kim et al., arXiv:2306.04940), early public results:
#: CIFAR-10, ResNet-32, mean top-1 on the clean test set. No corrupted-set numbers.
LAYERACT: dict[str, dict] = {
    "relu": {"top1": 91.79},
    "swish": {"top1": 91.96},
    "la-silu": {"top1": 92.30},
    "la-hardsilu": {"top1": 91.84},
}
