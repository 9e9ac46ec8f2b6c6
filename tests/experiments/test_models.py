"""VGG, ResNet50 (paper's parameter counts), TextRCNN and the Transformer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import anact
from anact.experiments.models.resnet import (
    Bottleneck,
    CifarResNet,
    NormalizedBottleneck,
    ResNet,
    resnet50,
    resnet50_normalized,
)
from anact.experiments.models.textrcnn import TextRCNN
from anact.experiments.models.transformer import Seq2SeqTransformer
from anact.experiments.models.vgg import VGG, VGG_CONFIGS, vgg19


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _acts(m: nn.Module, kinds=(nn.ReLU, nn.SiLU, anact.NormalizedActivation)) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, kinds)]


# ---------------------------------------------------------------- VGG


def test_vgg19_layout_and_parameter_count() -> None:
    m = vgg19(nn.ReLU, num_classes=100)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 16 and len(_acts(m)) == 18
    # by hand: 3×3 convs without bias (BN follows) + affine BN + the 3 linear layers
    widths = [v for v in VGG_CONFIGS["vgg19"] if v != "M"]
    expect, c = 0, 3
    for w in widths:
        expect += 9 * c * w + 2 * w
        c = w
    expect += (512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 100 + 100)
    assert n_params(m) == expect
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    no_bn = vgg19(nn.ReLU, batch_norm=False)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in no_bn.modules())
    assert n_params(no_bn) == expect - sum(2 * w for w in widths) + sum(widths)  # conv biases


def test_vgg_normalized_rules_bn_affine_top_activations_buffer_bn() -> None:
    m = VGG(anact.NSwish, "vgg11", num_classes=10, top_activation=nn.SiLU, num_top=3,
            buffer_bn=True, hidden=64, width_div=8)  # fmt: skip
    layers = list(m.features)
    pairs = [(layers[i], layers[i + 1]) for i in range(len(layers) - 1)
             if isinstance(layers[i], nn.BatchNorm2d)]  # fmt: skip
    assert len(pairs) == 8
    for bn, act in pairs:  # BN before a normalized activation has no affine
        assert bn.affine == (not isinstance(act, anact.NormalizedActivation))
    kinds = [type(a) for a in _acts(m)]
    assert kinds == [anact.NSwish] * 7 + [nn.SiLU] * 3  # the top three are plain
    assert isinstance(m.classifier[-2], nn.BatchNorm1d) and m.classifier[-2].num_features == 64
    m.train()
    assert m(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    forced = VGG(anact.NSwish, "vgg11", bn_affine=True, width_div=8, hidden=16)
    assert all(b.affine for b in forced.modules() if isinstance(b, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="num_top"):
        VGG(nn.ReLU, "vgg11", top_activation=nn.SiLU, num_top=11)


# ---------------------------------------------------------------- ResNet


def test_resnet50_plain_has_the_papers_parameter_count() -> None:
    m = resnet50(nn.ReLU, num_classes=100)
    assert n_params(m) == 23_705_252
    assert isinstance(m.maxpool, nn.Identity) and m.conv1.kernel_size == (3, 3)
    assert m.conv1.stride == (1, 1)
    blocks = [b for b in m.modules() if isinstance(b, Bottleneck)]
    assert len(blocks) == 16
    for b in blocks:  # ONE activation module per block
        assert sum(isinstance(c, nn.ReLU) for c in b.children()) == 1


@pytest.mark.parametrize("act", [anact.NReLU, anact.NSwish])
def test_resnet50_normalized_has_the_papers_parameter_count(act) -> None:
    m = resnet50_normalized(act, num_classes=100)
    assert n_params(m) == 23_690_053
    plain = type(act().activation.module())
    for b in m.modules():
        if isinstance(b, NormalizedBottleneck):
            assert isinstance(b.act1, act) and isinstance(b.act2, act) and b.act1 is not b.act2
            assert type(b.relu) is plain
            assert not b.bn1.affine and not b.bn2.affine and b.bn3.affine
    assert not m.bn1.affine and isinstance(m.relu, act)


def test_bottleneck_uses_its_relu_three_times() -> None:
    calls = []
    m = ResNet(nn.ReLU, layers=(1, 1), num_classes=5, base_width=4)
    block = m.layer1[0]
    block.relu.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape))
    m(torch.randn(2, 3, 8, 8))
    assert len(calls) == 3
    # reference: the same block written out with functional ReLU
    x = torch.randn(2, 16, 8, 8)
    b = m.layer2[0].eval()
    ref = torch.relu(b.bn1(b.conv1(x)))
    ref = torch.relu(b.bn2(b.conv2(ref)))
    ref = torch.relu(b.bn3(b.conv3(ref)) + b.downsample(x))
    assert_close(b(x), ref)


def test_small_normalized_resnet_trains_one_step() -> None:
    m = ResNet(anact.NSwish, (1, 1, 1, 1), num_classes=3, block="normalized", base_width=4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(m(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert int(m.layer1[0].act1.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="post_activation"):
        ResNet(nn.ReLU, (1,), block="normalized")
    m2 = ResNet(nn.ReLU, (1,), block="normalized", post_activation=nn.ReLU, stem="imagenet")
    assert isinstance(m2.maxpool, nn.MaxPool2d) and m2(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_cifar_resnet_depth_and_parameter_count() -> None:
    m = CifarResNet(anact.LASiLU, depth=8, num_classes=10)
    # by hand: stem 3·16·9 + BN; stages 16→16, 16→32 (/2), 32→64 (/2) of one BasicBlock
    stem = 3 * 16 * 9 + 32
    s1 = 2 * 16 * 16 * 9 + 2 * 32
    s2 = 16 * 32 * 9 + 32 * 32 * 9 + 2 * 64 + 16 * 32 + 64
    s3 = 32 * 64 * 9 + 64 * 64 * 9 + 2 * 128 + 32 * 64 + 128
    assert n_params(m) == stem + s1 + s2 + s3 + 64 * 10 + 10
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len([x for x in m.modules() if isinstance(x, anact.LASiLU)]) == 1 + 2 * 3
    assert len(CifarResNet(depth=32).blocks) == 15
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=30)


# ---------------------------------------------------------------- TextRCNN


def _batch(lengths: list[int], extra_pad: int = 0, vocab: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra_pad
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, vocab, (n,), generator=g)
    return ids, ids != 0


def test_textrcnn_ignores_padding() -> None:
    torch.manual_seed(0)
    m = TextRCNN(nn.ReLU, vocab_size=30, num_classes=3, embed_dim=8, hidden_size=6,
                 latent_size=5).eval()  # fmt: skip
    ids, mask = _batch([5, 2, 7])
    ids2, mask2 = _batch([5, 2, 7], extra_pad=4)
    out = m(ids, mask)
    assert out.shape == (3, 3)
    assert_close(m(ids2, mask2), out)
    # each sequence alone (no padding at all) gives the same logits
    for i, n in enumerate([5, 2, 7]):
        assert_close(m(ids[i : i + 1, :n]), out[i : i + 1])
    with pytest.raises(ValueError, match="at least one real token"):
        m(ids, torch.zeros_like(mask))


def test_textrcnn_contexts_follow_lai_et_al() -> None:
    torch.manual_seed(0)
    m = TextRCNN(nn.Tanh, vocab_size=30, embed_dim=4, hidden_size=3, latent_size=5, rnn="rnn")
    seen = []
    m.latent.register_forward_hook(lambda mod, i, o: seen.append(i[0].detach()))
    ids, mask = _batch([4, 2])
    m(ids, mask)
    x = seen[0]  # (N, L, 3 + 4 + 3): [left; emb; right]
    assert torch.all(x[:, 0, :3] == 0)  # no left context for the first word
    assert torch.all(x[0, 3, 7:] == 0) and torch.all(x[1, 1, 7:] == 0)  # none after the last
    # left context of word 1 is the forward state after word 0: h = tanh(W x + b + U·0)
    rnn = m.rnn
    e0 = m.embedding(ids[:, 0])
    h0 = torch.tanh(e0 @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + rnn.bias_hh_l0)
    assert_close(x[:, 1, :3], h0)
    assert_close(x[:, :, 3:7], m.embedding(ids))


class _RecordingNReLU(anact.NReLU):
    masks: list = []

    def forward(self, x, mask=None):
        type(self).masks.append(None if mask is None else mask.clone())
        return super().forward(x, mask=mask)


def test_textrcnn_passes_the_mask_to_normalized_activations() -> None:
    def stats(extra: int):
        torch.manual_seed(0)
        m = TextRCNN(anact.NReLU, vocab_size=30, embed_dim=8, hidden_size=6, latent_size=5)
        m.train()
        m(*_batch([5, 2, 7], extra_pad=extra))
        return m.act.running_mean.clone(), m.act.running_rho.clone()

    a, b = stats(0), stats(5)
    assert not torch.equal(a[0], torch.zeros_like(a[0]))  # statistics were taken
    assert_close(a[0], b[0])  # padding left out of μ
    assert_close(a[1], b[1])  # and of ρ
    _RecordingNReLU.masks.clear()
    m = TextRCNN(_RecordingNReLU, vocab_size=30, embed_dim=8, hidden_size=6, latent_size=5)
    ids, mask = _batch([3, 1])
    m(ids, mask)
    assert torch.equal(_RecordingNReLU.masks[0], mask.unsqueeze(-1))


# ---------------------------------------------------------------- Transformer


def _tiny_transformer(act=nn.ReLU, pre_ln: bool = True, **kw) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(act, 12, 12, d_model=16, nhead=2, num_encoder_layers=1,
                              num_decoder_layers=1, dim_ff=32, dropout=0.0, pre_ln=pre_ln,
                              **kw)  # fmt: skip


@pytest.mark.parametrize("pre_ln", [True, False])
def test_transformer_padding_and_causality(pre_ln: bool) -> None:
    m = _tiny_transformer(pre_ln=pre_ln).eval()
    src, _ = _batch([4, 2], vocab=12, seed=1)
    tgt, _ = _batch([5, 3], vocab=12, seed=2)
    out = m(src, tgt)
    assert out.shape == (2, 5, 12)
    src_p = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], 1)
    assert_close(m(src_p, tgt)[0], out[0])  # extra source padding changes nothing
    tgt2 = tgt.clone()
    tgt2[0, 3:] = 7  # change the future of row 0 from position 3 on
    assert_close(m(src, tgt2)[0, :3], out[0, :3])
    assert not torch.allclose(m(src, tgt2)[0, 3:], out[0, 3:])


def test_transformer_normalized_ffn_gets_the_mask() -> None:
    def stats(extra: int):
        m = _tiny_transformer(anact.NSwish).train()
        src, _ = _batch([4, 2], extra_pad=extra, vocab=12, seed=1)
        tgt, _ = _batch([5, 3], extra_pad=extra, vocab=12, seed=2)
        m(src, tgt)
        return [a.running_rho.clone() for a in _acts(m)]

    a, b = stats(0), stats(3)
    assert len(a) == 2
    for x, y in zip(a, b, strict=True):
        assert_close(x, y)


def test_transformer_learns_to_copy_and_greedy_decodes() -> None:
    m = _tiny_transformer(max_len=16)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    for _ in range(150):
        src = torch.randint(4, 12, (32, 4), generator=g)
        tgt = torch.cat([torch.full((32, 1), 2), src, torch.full((32, 1), 3)], 1)
        loss = nn.functional.cross_entropy(
            m(src, tgt[:, :-1]).reshape(-1, 12), tgt[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    src = torch.randint(4, 12, (16, 4), generator=g)
    out = m.greedy_decode(src, bos_id=2, eos_id=3, max_len=8)
    assert out.shape[1] <= 8
    assert (out[:, :4] == src).float().mean() > 0.9
    assert (out[:, 4] == 3).float().mean() > 0.9
    # after <eos> only padding
    for row in out:
        hit = (row == 3).nonzero()
        if len(hit):
            assert torch.all(row[int(hit[0]) + 1 :] == 0)
