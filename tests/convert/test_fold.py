"""anact.fold: eval-mode NormalizedActivation folded into the next layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import anact
from anact.convert import FoldedActivation


def _randomise(model: nn.Module, per_channel: bool, gen: torch.Generator) -> None:
    """Non-trivial running statistics and α, as after training."""
    for m in model.modules():
        if isinstance(m, anact.NormalizedActivation):
            shape = m.running_rho.shape
            with torch.no_grad():
                m.running_rho.copy_(0.3 + torch.rand(shape, generator=gen, dtype=torch.float64))
                m.running_rho_prime.copy_(0.4 + torch.rand(shape, generator=gen,
                                                           dtype=torch.float64))
                m.running_mean.copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
                m.alpha.copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
                m.num_batches_tracked.fill_(5)


class ConvNet(nn.Module):
    def __init__(self, per_channel: bool, dtype=torch.float64) -> None:
        super().__init__()

        def na(name, c):
            kw = {"num_features": c, "channel_dim": 1} if per_channel else {}
            return anact.NormalizedActivation(name, dtype=dtype, **kw)

        self.c1 = nn.Conv2d(3, 8, 3, padding=0)
        self.a1 = na("swish", 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)  # padded: shift stays
        self.a2 = na("relu", 8)
        self.c3 = nn.Conv2d(8, 4, 1, groups=4)
        self.a3 = na("lrelu", 4)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(4 * 4 * 4, 6)  # after flatten
        self.a4 = na("tanh", 6)
        self.fc2 = nn.Linear(6, 5)
        self.a5 = na("gelu", 5)  # its output is used twice: kept as FoldedActivation

    def forward(self, x):
        h = self.a2(self.c2(self.a1(self.c1(x))))
        h = self.drop(self.a3(self.c3(h)))
        h = self.a4(self.fc1(torch.flatten(h, 1)))
        h = self.a5(self.fc2(h))
        return h + h.square()


@pytest.mark.parametrize("per_channel", [False, True])
def test_fold_conv_net_matches_the_unfolded_model(per_channel):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = ConvNet(per_channel).double()
    _randomise(model, per_channel, gen)
    model.eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    folded, report = anact.fold(model, example_inputs=(x,), return_report=True)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    mods = dict(folded.named_modules())
    # c2 is zero-padded: it takes the scale, the shift stays before it
    assert isinstance(mods["a1"], FoldedActivation) and mods["a1"].scale is None
    assert isinstance(mods["a2"], nn.ReLU)
    assert isinstance(mods["a3"], nn.LeakyReLU)  # through Dropout and flatten into fc1
    assert isinstance(mods["a4"], nn.Tanh)
    assert isinstance(mods["a5"], FoldedActivation) and mods["a5"].scale is not None
    assert not any(isinstance(m, anact.NormalizedActivation) for m in folded.modules())
    assert len(report) == 5
    # the original is unchanged
    assert isinstance(model.a1, anact.NormalizedActivation)


def test_padded_conv_keeps_the_shift():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1),
                          anact.NormalizedActivation("relu", dtype=torch.float64),
                          nn.Conv2d(3, 2, 3, padding=1)).double()
    _randomise(model, False, gen)
    model.eval()
    folded, report = anact.fold(model, return_report=True)
    assert "shift kept" in report[0]
    m = folded.get_submodule("1")
    assert isinstance(m, FoldedActivation) and m.scale is None and m.shift is not None
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_per_channel_linear_needs_example_inputs_for_channel_dim_1():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7),
                          anact.NormalizedActivation("swish", 7, channel_dim=1,
                                                     dtype=torch.float64),
                          nn.Linear(7, 3, bias=False)).double()
    _randomise(model, True, gen)
    model.eval()
    x = torch.randn(9, 5, dtype=torch.float64)
    kept, rep = anact.fold(model, return_report=True)
    assert "pass example_inputs" in rep[0]
    assert isinstance(kept.get_submodule("1"), FoldedActivation)
    folded = anact.fold(model, example_inputs=(x,))
    assert isinstance(folded.get_submodule("1"), nn.SiLU)
    assert folded.get_submodule("2").bias is not None  # created to hold −W·c·μ
    with torch.no_grad():
        torch.testing.assert_close(kept(x), model(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_fold_converted_resnet_float32():
    from .models import ResNet

    torch.manual_seed(0)
    model = anact.convert(ResNet((1, 1, 1, 1), num_classes=10, width=8))
    x = torch.randn(8, 3, 8, 8)
    model.train()
    for _ in range(3):
        model(x + 0.1 * torch.randn_like(x))
    model.eval()
    folded, rep = anact.fold(model, return_report=True)
    # the stem feeds two 1x1 convs (conv1 and the downsample): both take c and μ
    assert isinstance(folded.relu, nn.ReLU)
    assert "layer1.0.conv1, layer1.0.downsample.0" in rep[0] or "downsample" in rep[0]
    with torch.no_grad():
        ref, out = model(x), folded(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_fold_without_running_stats_is_left_alone():
    model = nn.Sequential(nn.Linear(3, 3),
                          anact.NormalizedActivation("relu", track_running_stats=False),
                          nn.Linear(3, 2))
    folded, rep = anact.fold(model, return_report=True)
    assert "not folded" in rep[0]
    assert isinstance(folded.get_submodule("1"), anact.NormalizedActivation)


@pytest.mark.parametrize("per_channel", [False, True])
def test_fold_into_the_buffer_batchnorm(per_channel):
    # convert inserts a buffer BN before the head: the last activation folds into its statistics
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.SiLU(),
                          nn.Linear(8, 3)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    kw = {"channel_dim": -1} if per_channel else {}
    model = anact.convert(plain, example_inputs=(x,), **kw)
    for _ in range(3):
        model(x + 0.1 * torch.randn_like(x))
    _randomise(model, per_channel, torch.Generator().manual_seed(4))
    model.eval()
    folded, rep = anact.fold(model, return_report=True)
    assert "running statistics of 4_buffer_bn" in rep[1]
    assert isinstance(folded.get_submodule("3"), nn.SiLU)
    # and the buffer BN itself (eval: an affine map per feature) folds into the head
    assert rep[-1] == "4_buffer_bn: buffer BatchNorm folded into 4"
    from anact.convert import FeatureBatchNorm

    assert not any(isinstance(m, FeatureBatchNorm) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_fold_drops_the_mask_argument():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = anact.NSwish()
            self.out = nn.Linear(4, 2)

        def forward(self, x, mask):
            return self.out(self.act(self.fc(x), mask))

    torch.manual_seed(0)
    model = Masked().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.rand(3, 5, 1) > 0.3
    model(x, mask)
    model.eval()
    folded = anact.fold(model)
    assert isinstance(folded.act, nn.SiLU)
    with torch.no_grad():
        torch.testing.assert_close(folded(x, mask), model(x, mask), rtol=1e-10, atol=1e-10)


def test_untraceable_model_folds_in_modules_mode():
    from anact.convert import ConversionError

    from .models import Untraceable

    torch.manual_seed(0)
    x = torch.randn(8, 4, dtype=torch.float64)
    model = anact.convert(Untraceable().double(), mode="modules", example_inputs=(x,))
    model(x)
    _randomise(model, False, torch.Generator().manual_seed(5))
    model.eval()
    with pytest.raises(ConversionError, match="mode='modules'"):
        anact.fold(model)
    folded = anact.fold(model, mode="modules")
    assert type(folded) is Untraceable
    assert not any(isinstance(m, anact.NormalizedActivation) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


class PoolNet(nn.Module):
    """conv → act → max pool → conv → act → avg pool (ceil) → adaptive avg → flatten → fc."""

    def __init__(self, per_channel: bool, sign: float = 1.0) -> None:
        super().__init__()

        def na(name, c):
            kw = {"num_features": c, "channel_dim": 1} if per_channel else {}
            return anact.NormalizedActivation(name, dtype=torch.float64, **kw)

        self.c1 = nn.Conv2d(3, 6, 3)
        self.a1 = na("relu", 6)
        self.pool1 = nn.MaxPool2d(2, padding=1)  # pads with −inf: still a maximum
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.a2 = na("swish", 4)
        self.pool2 = nn.AvgPool2d(3, stride=2, ceil_mode=True)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)
        self.sign = sign

    def forward(self, x):
        h = self.pool1(self.a1(self.c1(x)))
        h = self.gap(self.pool2(self.a2(self.c2(h))))
        return self.fc(torch.flatten(h, 1))


def _pool_net(per_channel: bool, seed: int) -> PoolNet:
    torch.manual_seed(seed)
    model = PoolNet(per_channel).double()
    _randomise(model, per_channel, torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.mark.parametrize("per_channel", [False, True])
def test_fold_passes_through_max_and_average_pools(per_channel):
    model = _pool_net(per_channel, 6)
    for m in (model.a1, model.a2):  # positive scales: the max pool commutes
        with torch.no_grad():
            m.alpha.fill_(0.0)
    x = torch.randn(4, 3, 11, 11, dtype=torch.float64)
    folded, rep = anact.fold(model, example_inputs=(x,), return_report=True)
    assert "into c2" in rep[0] and "shift kept" in rep[0]  # c2 is zero-padded
    assert rep[1] == "a2: folded scale and shift into fc"
    mods = dict(folded.named_modules())
    assert isinstance(mods["a1"], FoldedActivation) and mods["a1"].scale is None
    assert isinstance(mods["a2"], nn.SiLU)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_fold_through_a_max_pool_needs_a_positive_scale():
    model = _pool_net(True, 7)
    with torch.no_grad():  # λ + β·tanh α < 0 in channel 2 (β = 1 would not reach it)
        model.a1.running_rho.fill_(50.0)
        model.a1.running_rho_prime.fill_(50.0)
        model.a1.beta = 1.0
        model.a1.alpha[2] = -5.0
    assert bool((model.a1.scale() <= 0).any())
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    folded, rep = anact.fold(model, example_inputs=(x,), return_report=True)
    assert rep[0] == "a1: kept: a max pool after it and a scale that is not positive"
    assert isinstance(folded.get_submodule("a1"), FoldedActivation)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_fold_does_not_pass_a_pool_over_its_channel_dimension():
    # per-channel statistics over the last dimension, which MaxPool1d pools
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv1d(2, 3, 1),
                          anact.NormalizedActivation("relu", 10, channel_dim=-1,
                                                     dtype=torch.float64),
                          nn.MaxPool1d(2), nn.Conv1d(3, 2, 1)).double()
    _randomise(model, True, gen)
    model.eval()
    x = torch.randn(4, 2, 10, dtype=torch.float64)
    folded, rep = anact.fold(model, example_inputs=(x,), return_report=True)
    assert rep[0] == "1: kept: MaxPool1d pools its channel dimension"
    # channel_dim=1 without example_inputs: the rank is unknown, so is the pooled dimension
    model2 = _pool_net(True, 9)
    _, rep2 = anact.fold(model2, return_report=True)
    assert "pass example_inputs" in rep2[0]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pool", [nn.AvgPool2d(3, padding=1),
                                  nn.AvgPool2d(2, divisor_override=3)])
def test_fold_keeps_average_pools_whose_weights_do_not_sum_to_one(pool):
    gen = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), anact.NormalizedActivation("swish",
                                                                         dtype=torch.float64),
                          pool, nn.Conv2d(3, 2, 1)).double()
    _randomise(model, False, gen)
    model.eval()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    folded, rep = anact.fold(model, return_report=True)
    assert rep[0] == "1: kept: its output feeds 2 (AvgPool2d), not a Linear/Conv"
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


class TiedLM(nn.Module):
    """An embedding tied to the output head (the same Parameter), as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 16), nn.Linear(16, 16)
        self.act, self.head = nn.ReLU(), nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(self.emb(tokens))))


@pytest.mark.parametrize("buffer_bn", [True, False])
def test_fold_into_a_tied_weight_leaves_its_other_user_alone(buffer_bn):
    """Folding writes c (and the buffer BatchNorm) into the head's own copy of a weight the
    embedding also uses; the embedding keeps the trained values."""
    torch.manual_seed(0)
    model = anact.convert(TiedLM(), buffer_bn=buffer_bn)
    for _ in range(3):
        model(torch.randint(0, 20, (4, 7)))
    model.eval()
    tokens = torch.randint(0, 20, (4, 7))
    folded, report = anact.fold(model, return_report=True)
    assert any("folded" in line for line in report)
    torch.testing.assert_close(folded(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.emb.weight, model.emb.weight, rtol=0, atol=0)
    assert folded.head.weight is not folded.emb.weight


def test_folded_activation_pickled_before_delta_was_a_module_still_runs():
    """A FoldedActivation pickled by an earlier version (no ``delta`` submodule) gets
    it back when loaded."""
    import pickle

    m = FoldedActivation(anact.NReLU().activation, torch.tensor(1.5), torch.tensor(0.2))
    x = torch.randn(4, 5)
    want = m(x)
    del m._modules["delta"]  # what an earlier version pickled
    loaded = pickle.loads(pickle.dumps(m))
    assert isinstance(loaded.delta, torch.nn.ReLU)
    assert torch.equal(loaded(x), want)


@pytest.mark.parametrize("mode", ["graph", "modules"])
def test_converting_a_folded_model_leaves_folded_activations_alone(mode):
    """δ inside a FoldedActivation is part of the folded activation, not a call site."""
    net = nn.Sequential(nn.Linear(4, 6), anact.NSwish(), nn.Linear(6, 6), nn.ReLU(),
                        nn.Linear(6, 2))  # fmt: skip
    net(torch.randn(8, 4))
    folded = anact.fold(net.eval(), mode="modules")
    again = anact.convert(folded, mode=mode, example_inputs=(torch.randn(3, 4),),
                          buffer_bn=False)  # fmt: skip
    normalized = [n for n, m in again.named_modules()
                  if isinstance(m, anact.NormalizedActivation)]  # fmt: skip
    assert len(normalized) == 1  # the plain ReLU only
    assert all(isinstance(m.delta, nn.SiLU) for m in again.modules()
               if isinstance(m, FoldedActivation))  # fmt: skip
