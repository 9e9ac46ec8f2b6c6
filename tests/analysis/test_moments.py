"""gaussian_moments / r_score against closed forms and scipy.integrate.quad (float64)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import ndtr

import anact.activations as acts
from anact.analysis import GaussianMoments, gaussian_moments, lambda_factor, r_score

SIGMAS = np.array([1e-3, 0.01, 0.1, 0.37, 1.0, 2.5, 10.0, 100.0])
ATOL = 1e-6


def _close(actual, expected, atol=ATOL, rtol=0.0):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- closed forms


def test_relu_closed_form():
    m = gaussian_moments("relu", SIGMAS)
    s = SIGMAS
    var = s**2 * (0.5 - 1 / (2 * math.pi))
    # relative tolerance for the moments that scale with σ (σ spans 1e-3..1e2)
    np.testing.assert_allclose(m.mean, s / math.sqrt(2 * math.pi), rtol=1e-9)
    np.testing.assert_allclose(m.second_moment, s**2 / 2, rtol=1e-9)
    np.testing.assert_allclose(m.var, var, rtol=1e-9)
    _close(m.rho, 0.5 - 1 / (2 * math.pi))
    _close(m.rho_prime, 0.5)
    r, rp = 0.5 - 1 / (2 * math.pi), 0.5
    _close(m.lam, math.sqrt((r + rp) / (2 * r * rp)))
    _close(r_score("relu", SIGMAS), math.log(1 - 1 / math.pi))


@pytest.mark.parametrize("slope", [0.01, 0.2, -0.5, 1.0])
def test_leaky_relu_closed_form(slope):
    s = SIGMAS
    m = gaussian_moments(("lrelu", {"negative_slope": slope}), s)
    # E[δ] = (1 − a)σ/√(2π); E[δ²] = (1 + a²)σ²/2; E[δ'²] = (1 + a²)/2
    mean = (1 - slope) * s / math.sqrt(2 * math.pi)
    second = (1 + slope**2) * s**2 / 2
    _close(m.mean / s, mean / s, atol=1e-12)  # mean is 0 for slope 1
    np.testing.assert_allclose(m.second_moment, second, rtol=1e-9)
    rho = (1 + slope**2) / 2 - (1 - slope) ** 2 / (2 * math.pi)
    rho_prime = (1 + slope**2) / 2
    _close(m.rho, rho)
    _close(m.rho_prime, rho_prime)
    _close(m.r_score, math.log(rho / rho_prime))  # slope 1 is the identity: R = 0


def test_elu_closed_form():
    # x < 0 pieces: E[e^{kx}; x<0] = e^{k²σ²/2} Φ(−kσ)
    a = 1.7
    s = np.array([0.05, 0.3, 1.0, 2.0, 4.0])
    e1 = np.exp(s**2 / 2) * ndtr(-s)
    e2 = np.exp(2 * s**2) * ndtr(-2 * s)
    mean = s / math.sqrt(2 * math.pi) + a * (e1 - 0.5)
    second = s**2 / 2 + a**2 * (e2 - 2 * e1 + 0.5)
    dsq = 0.5 + a**2 * e2
    m = gaussian_moments(("elu", {"alpha": a}), s)
    _close(m.mean, mean, atol=1e-9)
    _close(m.second_moment, second, atol=1e-9)
    _close(m.rho, (second - mean**2) / s**2, atol=1e-6)
    _close(m.rho_prime, dsq, atol=1e-9)


def test_identity_and_linear_functions_have_zero_r():
    s = np.logspace(-2, 2, 13)
    _close(r_score("identity", s), 0.0, atol=1e-12)
    m = gaussian_moments("linear", s)
    _close(m.rho, 1.0, atol=1e-12)
    _close(m.rho_prime, 1.0, atol=1e-12)
    _close(m.lam, 1.0, atol=1e-12)
    # any affine δ(x) = c·x + d: ρ = ρ' = c², R = 0 (the proposition's "if" direction)
    for c, d in [(3.0, 0.0), (-0.25, 2.0), (1e-3, -5.0)]:
        aff = acts.Activation(
            "affine", fn=lambda x, c=c, d=d: c * x + d, derivative=lambda x, c=c: c + 0 * x
        )
        m = gaussian_moments(aff, s)
        _close(m.rho, c * c, atol=1e-12)
        _close(m.rho_prime, c * c, atol=1e-12)
        _close(m.r_score, 0.0, atol=1e-10)


@pytest.mark.parametrize(
    "name", [n for n in acts.list_activations() if n != "identity"]
)
def test_every_registered_nonlinear_activation_has_negative_r(name):
    # the paper's proposition ("only if"): R < 0 for every nonlinear δ, at every σ
    r = r_score(name, np.logspace(-1, 1, 21))
    assert np.all(np.isfinite(r)), r
    assert np.all(r < -1e-9), (name, r.max())


# ----------------------------------------------------------------------------- vs scipy.quad


def _np_swish(x):
    return x / (1 + np.exp(-x))


def _np_dswish(x):
    s = 1 / (1 + np.exp(-x))
    return s + x * s * (1 - s)


def _np_gelu(x):
    return x * ndtr(x)


def _np_dgelu(x):
    return ndtr(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _np_softplus(x):  # torch's default: β = 1, linear above x = 20
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def _np_dsoftplus(x):
    return np.where(x > 20, 1.0, 1 / (1 + np.exp(-np.minimum(x, 20))))


def _quad_moments(f, df, sigma, points=()):
    def e(g):
        dens = lambda x: g(x) * math.exp(-0.5 * (x / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        lim = 14 * sigma
        pts = [p for p in points if -lim < p < lim]
        val, _ = integrate.quad(dens, -lim, lim, points=pts or None, epsabs=1e-13,
                                epsrel=1e-13, limit=400)
        return val

    mean = e(f)
    var = e(lambda x: (f(x) - mean) ** 2)
    return mean, var / sigma**2, e(lambda x: df(x) ** 2)


@pytest.mark.parametrize(
    "name,f,df,points",
    [
        ("swish", _np_swish, _np_dswish, ()),
        ("gelu", _np_gelu, _np_dgelu, ()),
        ("softplus", _np_softplus, _np_dsoftplus, (20.0,)),
    ],
)
def test_smooth_functions_match_scipy_quad(name, f, df, points):
    sig = np.array([0.02, 0.5, 1.0, 3.0, 30.0])
    m = gaussian_moments(name, sig)
    for i, s in enumerate(sig):
        mean, rho, rho_prime = _quad_moments(f, df, float(s), points)
        _close(m.mean[i], mean, atol=1e-8)
        _close(m.rho[i], rho, atol=1e-7)
        _close(m.rho_prime[i], rho_prime, atol=1e-8)
        _close(m.r_score[i], math.log(rho / rho_prime), atol=1e-6)


def test_lambda_factor_formula():
    r, rp = np.array([0.3, 1.0, 2.0]), np.array([0.5, 1.0, 0.1])
    expected = [math.sqrt((a + b) / (2 * a * b)) for a, b in zip(r, rp, strict=True)]
    _close(lambda_factor(r, rp), expected, atol=1e-15)
    assert isinstance(lambda_factor(1.0, 1.0), float)


# ----------------------------------------------------------------------------- API shape / errors


def test_scalar_in_float_out():
    m = gaussian_moments("tanh", 0.7)
    assert isinstance(m, GaussianMoments)
    for v in (m.mean, m.second_moment, m.var, m.rho, m.rho_prime, m.lam, m.r_score):
        assert type(v) is float
    assert type(r_score("tanh", np.float64(0.7))) is float
    with pytest.raises(AttributeError):
        m.rho = 1.0  # frozen


@pytest.mark.parametrize(
    "sigma",
    [[0.5, 1.0, 2.0], np.array([[0.5, 1.0], [2.0, 4.0]]), torch.tensor([0.5, 1.0, 2.0])],
)
def test_array_in_same_shape_out(sigma):
    r = r_score("swish", sigma)
    shape = np.asarray(sigma).shape
    assert isinstance(r, np.ndarray) and r.dtype == np.float64 and r.shape == shape
    flat = np.asarray(sigma, dtype=np.float64).ravel()
    # each element equals the scalar computation at that σ
    _close(r.ravel(), [r_score("swish", float(v)) for v in flat], atol=1e-14)


def test_activation_specs_are_equivalent():
    s = [0.3, 3.0]
    a = r_score(("lrelu", {"negative_slope": 0.3}), s)
    b = r_score(acts.get_activation("lrelu", negative_slope=0.3), s)
    _close(a, b, atol=0)
    assert not np.allclose(a, r_score("lrelu", s))  # the default slope differs


@pytest.mark.parametrize("bad", [0.0, -1.0, [1.0, 0.0], float("nan"), float("inf"), []])
def test_bad_sigma_raises(bad):
    with pytest.raises(ValueError, match="sigma"):
        gaussian_moments("relu", bad)


def test_bad_activation_raises():
    with pytest.raises(KeyError, match="unknown activation"):
        r_score("not_an_activation", 1.0)
    with pytest.raises(TypeError, match="activation must be"):
        r_score(42, 1.0)
    with pytest.raises(TypeError):
        r_score(("lrelu", {"no_such_param": 1}), 1.0)
    with pytest.raises(TypeError, match="sigma"):
        r_score("relu", "abc")
