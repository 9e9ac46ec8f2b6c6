"""The native path's statistics step (``_nactcpu.finish``): from the C sums to the running
update and λ, per tensor and per channel, against a float64 reference written here from
the rules of anact.functional (moments_to_stats, update_running_stats, lambda_factor;
eq. 13, 16–18, 31) and against the tensor rules themselves."""

import math
import os

import numpy as np
import pytest
import torch

import anact.functional as AF
from anact.kernels import native

pytestmark = pytest.mark.skipif(
    not native.available() and os.environ.get("ANACT_ALLOW_NO_C") == "1",
    reason="anact._nactcpu not built and ANACT_ALLOW_NO_C=1",
)

F32 = torch.finfo(torch.float32)


def _f32(v: float) -> float:
    return float(np.float32(v))


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1, a) == math.copysign(1, b)


def _reference_moments(row, count):
    """(count, mean_x, var_x, mean_y, var_y, mean_dsq) of one channel's C row, float32."""
    sx, sxx, sy, syy, sg, kx, ky = row
    n = float(count)
    mx, my = sx / n, sy / n
    var_x, var_y = sxx / n - mx * mx, syy / n - my * my
    var_x = 0.0 if var_x < 0 else var_x
    var_y = 0.0 if var_y < 0 else var_y
    dsq = sg / n if sy == sy else math.nan
    return [_f32(v) for v in (n, kx + mx, var_x, ky + my, var_y, dsq)]


def _reference_stats(m):
    """(rho, rho_prime, mu, valid): functional.moments_to_stats on floats."""
    count, mean_x, var_x, mean_y, var_y, dsq = m
    if var_x != 0:
        rho = var_y / var_x
    else:
        rho = math.nan if var_y == 0 or math.isnan(var_y) else math.inf
    spread = 4 * F32.eps * abs(mean_x)
    constant = var_x <= spread * spread + F32.tiny

    def finite(v):
        return abs(v) <= F32.max

    valid = (count >= 2 and not constant and finite(rho) and finite(dsq) and finite(mean_y)
             and rho > 0 and dsq > 0)  # fmt: skip
    return rho, dsq, mean_y, valid


def _reference_lambda(rho, rho_prime, eps):
    if eps is not None:
        rho = rho if math.isnan(rho) or rho >= eps else eps
        rho_prime = rho_prime if math.isnan(rho_prime) or rho_prime >= eps else eps
    num, den = rho + rho_prime, 2 * rho * rho_prime
    if den == 0:
        q = math.copysign(math.inf, num) * math.copysign(1.0, den) if num != 0 else math.nan
    else:
        q = num / den
    return math.sqrt(q) if q >= 0 else math.nan


def _reference_finish(rows, count, running, seen, *, training, momentum, bounds, eps, center):
    """Per channel: (lam, shift) the pass normalizes with, the running values after the
    step (each rounded to float32 once, as stored), the count and the invalid channels."""
    m = 1.0 / (seen + 1) if momentum is None else momentum
    lams, shifts, new_running, invalid = [], [], [], 0
    for c, row in enumerate(rows):
        if row is None:  # eval: the running values
            rho, rho_prime, mu = running[c]
            new_running.append(running[c])
        else:
            rho, rho_prime, mu, valid = _reference_stats(_reference_moments(row, count))
            invalid += not valid
            if running is None:
                if not valid:
                    rho, rho_prime, mu = 1.0, 1.0, 0.0
            elif not valid:
                rho, rho_prime, mu = running[c]
                new_running.append(running[c])
            else:
                def blend(run, new, filtered):
                    if seen == 0:
                        return new
                    low, high = bounds or (0.0, math.inf)
                    if filtered and bounds is not None and not low * run < new < high * run:
                        return run
                    return run + m * (new - run)

                run_rho, run_rho_prime, run_mean = running[c]
                rho = _f32(blend(run_rho, rho, True))
                rho_prime = _f32(blend(run_rho_prime, rho_prime, True))
                mu = _f32(blend(run_mean, mu, False))
                new_running.append((rho, rho_prime, mu))
        lams.append(_f32(_reference_lambda(rho, rho_prime, eps)))
        shifts.append(_f32(mu if center else 0.0))
    counted = rows[0] is not None and running is not None and invalid < len(rows)
    return lams, shifts, new_running, seen + counted, invalid


def _sums(x, act="swish", channel_dim=None):
    """The C rows of sums of x, by the statistics pass itself."""
    x = x.contiguous()
    kind = native.native_kind(AF.resolve_activation(act))
    outer, c, inner = native._layout(x, channel_dim)
    sums, y = torch.empty((c, 7), dtype=torch.float64), torch.empty_like(x)
    native._nactcpu.stats(x.data_ptr(), y.data_ptr(), outer, c, inner, *kind, sums.data_ptr(), 1)
    return sums, outer * inner


def _finish(sums, count, c, buffers, *, training=True, momentum=0.1, bounds=(0.2, 5.0),
            eps=1e-5, center=True):  # fmt: skip
    lam, shift = torch.empty(c), torch.empty(c)
    has_running = buffers is not None
    rr, rrp, rm, nbt = buffers if has_running else (None,) * 4
    invalid, lam0, shift0 = native._nactcpu.finish(
        0 if sums is None else sums.data_ptr(), c, float(count), False,
        *((rr.data_ptr(), rrp.data_ptr(), rm.data_ptr()) if has_running else (0, 0, 0)),
        False, nbt.data_ptr() if has_running else 0, has_running and nbt.dim() > 0, training,
        math.nan if momentum is None else momentum, bounds is not None,
        *(bounds or (0.0, 0.0)), math.nan if eps is None else eps, center,
        lam.data_ptr(), False, shift.data_ptr(), False,
    )  # fmt: skip
    assert _same(lam0, lam[0].item()) and _same(shift0, shift[0].item())
    return lam.tolist(), shift.tolist(), invalid


def _batch(rng, c, n=40):
    """A batch with channels of every kind: usable, constant, all negative (dead ReLU),
    NaN, huge (var overflows float32), a spread of a few ulps of the mean."""
    x = rng.normal(size=(n, c)).astype(np.float32) * rng.uniform(0.1, 3, size=c).astype(np.float32)
    kinds = rng.choice(6, size=c, p=[0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    for j, k in enumerate(kinds):
        if k == 1:
            x[:, j] = 1.5
        elif k == 2:
            x[:, j] = -np.abs(x[:, j]) - 0.1
        elif k == 3:
            x[rng.integers(n), j] = np.nan
        elif k == 4:
            x[:, j] *= 1e30
        elif k == 5:  # spread of 3 ulps of the mean: constant by the 4-ulp rule
            x[:, j] = 1024 + np.where(np.arange(n) % 2, 3, -3) * np.spacing(np.float32(1024))
    return torch.from_numpy(x)


@pytest.mark.parametrize("act", ["relu", "swish"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bounds", [(0.2, 5.0), None])
@pytest.mark.parametrize("c", [1, 7])
def test_finish_matches_the_float64_rules_bit_for_bit(act, momentum, bounds, c):
    """Ten steps of training then eval: the running values, count, λ and shift of every
    channel equal the float64 reference's, including unusable channels and outliers."""
    rng = np.random.default_rng(c * 100 + (momentum is None) * 10 + (bounds is None))
    buffers = (torch.ones(c), torch.ones(c), torch.zeros(c), torch.zeros((), dtype=torch.long))
    running, seen, left_out = [(1.0, 1.0, 0.0)] * c, 0, 0
    for step in range(12):
        training = step < 10
        x = _batch(rng, c)
        if c == 1 and step in (0, 4):  # a usable batch, then an outlier against it
            x = torch.randn(40, 1) * (1.0 if step == 0 else 40.0)
        sums, count = _sums(x, act, channel_dim=1)
        if not training:
            sums = None
        center = step % 3 != 1
        lam, shift, invalid = _finish(sums, count, c, buffers, training=training,
                                      momentum=momentum, bounds=bounds, center=center)  # fmt: skip
        rows = [None] * c if sums is None else sums.tolist()
        want_lam, want_shift, running, seen, want_invalid = _reference_finish(
            rows, count, running, seen, training=training, momentum=momentum, bounds=bounds,
            eps=1e-5, center=center,
        )  # fmt: skip
        assert invalid == want_invalid
        left_out += invalid
        for got, want in ((lam, want_lam), (shift, want_shift)):
            assert all(_same(a, b) for a, b in zip(got, want, strict=True)), (step, got, want)
        for k in range(3):
            stored = buffers[k].tolist()
            assert all(_same(a, r[k]) for a, r in zip(stored, running, strict=True)), (step, k)
        assert int(buffers[3]) == seen
    assert left_out > 0 and 0 < seen <= 10  # unusable channels met, usable batches counted
    if c == 1:
        assert seen < 10  # an unusable batch is not counted


def test_finish_without_running_values_uses_the_batch_or_the_identity():
    rng = np.random.default_rng(3)
    x = _batch(rng, 9)
    sums, count = _sums(x, "relu", channel_dim=1)
    lam, shift, invalid = _finish(sums, count, 9, None)
    want_lam, want_shift, _, _, want_invalid = _reference_finish(
        sums.tolist(), count, None, 0, training=True, momentum=0.1, bounds=None, eps=1e-5,
        center=True,
    )  # fmt: skip
    assert invalid == want_invalid > 0
    assert all(_same(a, b) for a, b in zip(lam + shift, want_lam + want_shift, strict=True))


@pytest.mark.parametrize("eps", [1e-5, None])
def test_finish_lambda_of_stored_values_follows_the_tensor_formula(eps):
    """Eval: λ of running values that are 0, tiny, huge, inf or NaN as lambda_factor gives
    them (the floor at eps, inf and NaN where the formula gives them)."""
    values = [0.0, 1e-30, 1e-5, 0.5, 1.0, 7.0, 1e30, math.inf, math.nan]
    pairs = [(a, b) for a in values for b in values]
    c = len(pairs)
    rho = torch.tensor([a for a, _ in pairs])
    rho_prime = torch.tensor([b for _, b in pairs])
    buffers = (rho, rho_prime, torch.randn(c), torch.tensor(5))
    lam, shift, invalid = _finish(None, 0, c, buffers, training=False, eps=eps)
    want = AF.lambda_factor(rho.double(), rho_prime.double(), eps).float().tolist()
    assert invalid == 0 and int(buffers[3]) == 5
    assert all(_same(a, b) for a, b in zip(lam, want, strict=True)), (lam, want)
    assert shift == buffers[2].tolist()


def test_finish_matches_the_tensor_rules():
    """The same steps through functional._normalization_stats (float32 tensor ops): equal
    up to float32 rounding (the C step computes in double and rounds once)."""
    torch.manual_seed(5)
    c = 6
    state_c = [torch.ones(c), torch.ones(c), torch.zeros(c), torch.zeros((), dtype=torch.long)]
    state_t = [t.clone() for t in state_c]
    for step in range(8):
        x = torch.randn(30, c) * (1 + step % 3)
        if step == 2:
            x[:, 1] = -1.0  # dead ReLU channel: left out
        sums, count = _sums(x, "relu", channel_dim=1)
        lam_c, shift_c, _ = _finish(sums, count, c, state_c)
        moments = native._moments(sums, count, True, torch.float32)
        rho, rho_prime, mu, valid = AF._normalization_stats(
            moments, *state_t, training=True, momentum=0.1, bounds=(0.2, 5.0)
        )
        lam_t = AF.lambda_factor(rho, rho_prime, 1e-5)
        assert int(state_c[3]) == int(state_t[3])
        for a, b in zip(state_c[:3], state_t[:3], strict=True):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(torch.tensor(lam_c), lam_t, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(torch.tensor(shift_c), mu, rtol=2e-6, atol=1e-7)


def test_finish_checks_its_arguments():
    with pytest.raises(ValueError, match="C >= 1"):
        native._nactcpu.finish(0, 1, 2.0, False, 0, 0, 0, False, 0, False, True, 0.1, True,
                               0.2, 5.0, 1e-5, True, 0, False, 0, False)  # fmt: skip
    sums = torch.zeros((1, 7), dtype=torch.float64)
    rr = torch.ones(1)
    with pytest.raises(ValueError, match="all four running buffers"):
        native._nactcpu.finish(sums.data_ptr(), 1, 2.0, False, rr.data_ptr(), 0, 0, False,
                               0, False, True, 0.1, True, 0.2, 5.0, 1e-5, True, 0, False, 0,
                               False)  # fmt: skip
