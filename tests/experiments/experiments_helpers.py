"""Helpers of the experiments tests: IDX files written independently of the loaders,
a simulated crash, the stored rows of a results database. (A uniquely named module:
``from conftest import ...`` would find another directory's conftest.)"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write ``array`` (uint8) as an IDX file, independently of the loader."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28×28 images: class k lights a 6×6 block at a class-specific place."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(y):
        r, c = 3 + 7 * (k // 4), 3 + 7 * (k % 4)
        x[i, r : r + 6, c : c + 6] = 200
    return x, y


def write_dataset(
    root: Path, n_train: int = 512, n_test: int = 256, gz: bool = False
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tx, ty = make_images(n_train, 0)
    vx, vy = make_images(n_test, 1)
    write_idx(root / "train-images-idx3-ubyte", tx, gz=gz)
    write_idx(root / "train-labels-idx1-ubyte", ty, gz=gz)
    write_idx(root / "t10k-images-idx3-ubyte", vx, gz=gz)
    write_idx(root / "t10k-labels-idx1-ubyte", vy, gz=gz)
    return root


class Boom(Exception):
    """A simulated crash inside a training run."""


def crashing_in_epoch_2(study):
    """``study`` whose runs raise :class:`Boom` when their second epoch starts (after
    the first epoch's checkpoint), counted over all runs it builds."""
    import dataclasses

    epochs: list[int] = []

    def build(config, activation, seed, data, device):
        trial = study.build(config, activation, seed, data, device)
        inner = trial.train_epoch

        def train_epoch(gen, after_step):
            epochs.append(1)
            if len(epochs) == 2:
                raise Boom("killed in epoch 2")
            return inner(gen, after_step)

        trial.train_epoch = train_epoch
        return trial

    return dataclasses.replace(study, build=build)


def stored(out: Path, activation: str | None = None) -> dict:
    """{(activation, seed): [(epoch, loss, acc, score, Σ|E W|), ...]} of the finished runs
    in ``out/results.sqlite`` (of one activation, if given)."""
    from anact.experiments.runner import RESULTS_FILE
    from anact.experiments.store import Store

    with Store(out / RESULTS_FILE) as st:
        return {
            (r["activation"], r["seed"]): [
                (e["epoch"], e["train_loss"], e["val_acc"], e["score"], e["weight_mean_abs_sum"])
                for e in st.epochs(r["id"])
            ]
            for r in st.runs(status="done")
            if activation in (None, r["activation"])
        }
