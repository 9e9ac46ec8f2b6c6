"""Data sets as tensors on the device (no DataLoader): one module per data format.

``idx``: MNIST / Fashion-MNIST from IDX files. Other studies add ``data/<name>.py``.
"""

from anact.experiments.data.idx import (
    DATASETS,
    DataError,
    ImageData,
    find_idx_file,
    load_image_dataset,
    read_idx,
    read_idx_dataset,
)

__all__ = [
    "DATASETS", "DataError", "ImageData", "find_idx_file", "load_image_dataset", "read_idx",
    "read_idx_dataset",
]  # fmt: skip
