"""Quick end-to-end runs of the studies vgg, resnet, layeract, text, translation
(tiny data written here or by conftest, tiny models, one epoch) through the runner."""

from __future__ import annotations

import bz2
import csv
import io
from pathlib import Path

import pytest
import torch

from anact.experiments import get_study, reproduce
from anact.experiments.data import DataError
from anact.experiments.store import Store

TINY_IMAGE = {"epochs": 1, "train_subset": 128, "batch_size": 64}


def _run(name: str, overrides: dict, activations: list[str], out: Path) -> list[dict]:
    study = get_study(name)
    rows = reproduce(study, study.config(overrides), activations, out_dir=out, quiet=True)
    assert sorted(r["activation"] for r in rows) == sorted(activations)
    assert all(r["status"] == "done" for r in rows)
    with Store(out / "results.sqlite") as store:
        epochs = [store.epochs(r["id"]) for r in rows]
    for ep in epochs:
        assert len(ep) == overrides.get("epochs", 1)
        assert ep[-1]["train_loss"] == ep[-1]["train_loss"]  # not NaN
    return [e[-1] for e in epochs]


def test_paper_presets_and_registration() -> None:
    for name in ("vgg", "vgg-nobn", "resnet", "resnet-tiny", "layeract", "text", "translation"):
        s = get_study(name)
        quick, full = s.config(), s.config(paper=True)
        assert full["epochs"] > quick["epochs"] and full["runs"] == 3
    assert get_study("resnet").config(paper=True)["layers"] == [3, 4, 6, 3]
    assert get_study("vgg").config(paper=True)["dataset"] == "cifar100"
    assert get_study("text").config(paper=True)["dataset"] == "imdb"


def test_vgg_study_quick(fake_mnist: Path, tmp_path: Path) -> None:
    cfg = {**TINY_IMAGE, "data_dir": str(fake_mnist), "config": "vgg11", "width_div": 16,
           "hidden": 32}  # fmt: skip
    last = _run("vgg", cfg, ["relu", "nswish"], tmp_path)
    assert all(0 <= e["val_acc"] <= 100 and e["val_acc_top5"] >= e["val_acc"] for e in last)
    nobn = {**cfg, "epochs": 1}
    _run("vgg-nobn", nobn, ["selu", "nrelu"], tmp_path / "nobn")


def test_resnet_study_quick_uses_figure6_blocks(fake_mnist: Path, tmp_path: Path) -> None:
    from anact.experiments.models.resnet import NormalizedBottleneck
    from anact.experiments.studies.resnet import build
    from anact.experiments.studies.vgg import load_images

    cfg = {**TINY_IMAGE, "data_dir": str(fake_mnist), "layers": [1, 1], "base_width": 4}
    _run("resnet", cfg, ["relu", "nrelu"], tmp_path)
    study = get_study("resnet")
    conf = study.config(cfg)
    trial = build(conf, "nswish", 0, load_images(conf, torch.device("cpu")), torch.device("cpu"))
    assert any(isinstance(m, NormalizedBottleneck) for m in trial.model.modules())


def test_layeract_study_quick_reports_corrupted_accuracy(fake_mnist: Path, tmp_path: Path) -> None:
    from anact.experiments.studies.layeract import build, load_data

    cfg = {**TINY_IMAGE, "data_dir": str(fake_mnist), "corruptions": ["gaussian_noise",
           "contrast"], "severities": [1, 5], "corrupt_subset": 64}  # fmt: skip
    _run("layeract", cfg, ["relu", "la-silu"], tmp_path)
    study = get_study("layeract")
    conf = study.config(cfg)
    data = load_data(conf, torch.device("cpu"))
    assert data.raw_val.shape[0] == 64 and float(data.raw_val.min()) >= 0
    assert float(data.raw_val.max()) <= 1
    trial = build(conf, "la-hardsilu", 0, data, torch.device("cpu"))
    metrics = trial.evaluate()
    assert set(metrics) >= {"val_acc", "corrupt_acc", "corrupt_acc/contrast", "corrupt_clean_acc"}
    assert 0 <= metrics["corrupt_acc"] <= 100
    # the clean accuracy the drop is taken from: on the same 64 images that were corrupted
    with torch.no_grad():
        pred = trial.model(data.images.val_x[:64]).argmax(1)
    same_images = 100.0 * int((pred == data.images.val_y[:64]).sum()) / 64
    assert metrics["corrupt_clean_acc"] == pytest.approx(same_images)


def _rt_file(path: Path, n: int = 200) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for i in range(n):
        good = i % 2 == 0
        text = f"film {i} was {'great fun' if good else 'a dull mess'} ."
        w.writerow(["fresh" if good else "rotten", text, "m", "False"])
    path.write_bytes(bz2.compress(buf.getvalue().encode()))
    return path


def test_text_study_quick_learns_an_easy_task(tmp_path: Path) -> None:
    cfg = {"data_dir": str(_rt_file(tmp_path / "rt.csv.bz2")), "epochs": 3, "min_freq": 1,
           "embed_dim": 16, "hidden_size": 16, "latent_size": 16, "batch_size": 16}  # fmt: skip
    last = _run("text", cfg, ["relu", "nrelu"], tmp_path / "out")
    assert all(e["val_acc"] >= 90 for e in last)  # "great fun" vs "a dull mess"


def test_translation_study_quick(tmp_path: Path) -> None:
    verbs = [("läuft", "runs"), ("schläft", "sleeps"), ("sitzt", "sits"), ("isst", "eats")]
    lines = [f"Hund {i} {de} hier. :: Dog {i} {en} here." for i in range(30) for de, en in verbs]
    p = tmp_path / "de-en"
    p.write_text("\n".join(lines) + "\n")
    cfg = {"data_dir": str(p), "epochs": 2, "d_model": 16, "nhead": 2, "layers": 1,
           "dim_ff": 32, "min_freq": 1, "batch_size": 16, "lr": 3e-3}  # fmt: skip
    last = _run("translation", cfg, ["relu", "nswish"], tmp_path / "out")
    assert all(0 <= e["val_acc"] <= 100 for e in last)
    from anact.experiments.report import write_report

    write_report(tmp_path / "out", figures=False)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "validation = greedy decoding of the fixed validation split" in text
    assert "official test split" not in text


@pytest.mark.parametrize("name", ["vgg", "resnet", "layeract"])
def test_image_studies_reject_unpackaged_data_without_dir(name: str) -> None:
    study = get_study(name)
    with pytest.raises(DataError, match="data-dir"):
        study.load_data(study.config({"dataset": "cifar100"}), torch.device("cpu"))


def test_random_crop_flip_gives_a_shifted_possibly_flipped_crop() -> None:
    from anact.experiments.studies.vgg import random_crop_flip

    x = torch.randn(12, 3, 8, 8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    kinds = set()
    for k in range(12):
        hits = [
            (i, j, f)
            for i in range(5)
            for j in range(5)
            for f in (False, True)
            if torch.equal(
                out[k], (lambda c: c.flip(2) if f else c)(padded[k, :, i : i + 8, j : j + 8])
            )  # noqa: B023
        ]
        assert hits, k  # every output is one of the 5·5·2 candidates
        kinds.add(hits[0][2])
    assert kinds == {False, True}  # both flipped and unflipped occur
    again = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, again)
