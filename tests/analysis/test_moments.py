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


def test_lambda_factor_edges_are_the_analysis_convention():
    """+inf where ρ or ρ' is 0 (a dead δ; the monitor's and gaussian_moments' λ too), NaN
    for NaN or negative input, and no underflow of ρρ' (exact: sqrt(1/(2ρ) + 1/(2ρ')))."""
    from fractions import Fraction

    lam = lambda_factor([0.0, 0.0, 2.0, math.nan, -1.0, 1e-200], [0.0, 3.0, 0.0, 1.0, 1.0, 1e-200])
    assert lam[:3].tolist() == [math.inf] * 3
    assert np.isnan(lam[3:5]).all()
    exact = math.sqrt(float(Fraction(1, 2) / Fraction(1e-200) * 2))  # 1/(2ρ) + 1/(2ρ')
    _close(lam[5], exact, atol=0, rtol=1e-15)


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


# ----------------------------------------------------------------------------- the whole σ range
# The quadrature used to be a σ-scaled grid only: δ' of tanh/sigmoid (a peak of width ~1 at 0)
# fell between its nodes for large σ (R(tanh, 1e4) came out +32.9), and σ² under/overflowed
# at the ends (ReLU's R was −0.411 at σ = 1e-160, NaN at 1e160).

WIDE = np.array([1e-150, 1e-100, 1e-30, 1e-6, 1.0, 1e6, 1e30, 1e100, 1e150])
OUTSIDE = [1e-300, 1e-160, 1e160, 1e300]


@pytest.mark.parametrize("slope", [0.0, 0.01, 0.2, -0.5, 1.0])
def test_piecewise_linear_closed_forms_over_the_whole_sigma_range(slope):
    # ReLU (slope 0), LeakyReLU and the identity (slope 1): ρ, ρ', λ, R are constant in σ,
    # mean, E[δ²], Var scale as σ, σ²; exact to a few ulps from σ = 1e-150 to 1e150
    act = "relu" if slope == 0 else ("lrelu", {"negative_slope": slope})
    m = gaussian_moments(act, WIDE)
    rho = (1 + slope**2) / 2 - (1 - slope) ** 2 / (2 * math.pi)
    rp = (1 + slope**2) / 2
    rt = 1e-14
    np.testing.assert_allclose(m.rho, rho, rtol=rt)
    np.testing.assert_allclose(m.rho_prime, rp, rtol=rt)
    _close(m.r_score, math.log(rho / rp), atol=rt)
    np.testing.assert_allclose(m.lam, math.sqrt((rho + rp) / (2 * rho * rp)), rtol=rt)
    _close(m.mean / WIDE, (1 - slope) / math.sqrt(2 * math.pi), atol=rt)
    np.testing.assert_allclose(m.second_moment / WIDE**2, rp, rtol=rt)
    np.testing.assert_allclose(m.var / WIDE**2, rho, rtol=rt)
    # beyond, σ² leaves float64's range: refused, not a wrong number or NaN
    for s in OUTSIDE:
        with pytest.raises(ValueError, match=r"sigma must lie in \[1e-150, 1e\+150\]"):
            gaussian_moments(act, s)
        with pytest.raises(ValueError, match="sigma must lie in"):
            r_score(act, [1.0, s])


def _logistic(x):
    return 0.5 + 0.5 * math.tanh(0.5 * x)


def _dlogistic(x):
    e = math.exp(-abs(x))
    return e / (1 + e) ** 2


def _dtanh(x):  # sech², without cosh's overflow
    e = math.exp(-2 * abs(x))
    return 4 * e / (1 + e) ** 2


# δ − c, δ', c: the reference integrates δ − c (sigmoid − 1/2 = tanh(x/2)/2 keeps its digits
# at tiny x, where sigmoid itself rounds to 1/2)
_REFERENCE = {
    "tanh": (math.tanh, _dtanh, 0.0),
    "sigmoid": (lambda x: 0.5 * math.tanh(0.5 * x), _dlogistic, 0.5),
    "swish": (lambda x: x * _logistic(x), lambda x: _logistic(x) + x * _dlogistic(x), 0.0),
    "gelu": (
        lambda x: x * ndtr(x),
        lambda x: ndtr(x) + x * math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi),
        0.0,
    ),
}


def _quad_expect(g, sigma):
    """E[g(x)], x ~ N(0, σ²), by scipy's adaptive quad over |x| ≤ 14σ, split at 0, at ±2^k
    (the activations' own scale) and at multiples of σ; relative tolerance only."""
    lim = 14 * sigma
    pts = {0.0}
    for u in (0.5, 1, 2, 4, 8, 16, 32, 64):
        pts |= {u, -u}
    for k in (0.5, 1, 2, 3, 4, 6, 8, 10, 12):
        pts |= {k * sigma, -k * sigma}
    edges = [-lim, *sorted(p for p in pts if -lim < p < lim), lim]
    c = 1 / (sigma * math.sqrt(2 * math.pi))

    def f(x):
        return g(x) * math.exp(-0.5 * (x / sigma) ** 2) * c

    return math.fsum(
        integrate.quad(f, a, b, epsabs=0, epsrel=1e-13, limit=200)[0]
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    )


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("name", sorted(_REFERENCE))
def test_bounded_and_smooth_functions_match_quad_for_tiny_to_huge_sigma(name):
    f, df, c = _REFERENCE[name]
    sig = np.array([1e-6, 1e-2, 1.0, 100.0, 300.0, 1000.0, 1e4, 1e6])
    m = gaussian_moments(name, sig)  # one vectorised call over the whole range
    for i, s in enumerate(sig):
        s = float(s)
        mean_c = _quad_expect(f, s)
        rho = _quad_expect(lambda x, s=s, mc=mean_c: ((f(x) - mc) / s) ** 2, s)
        rho_prime = _quad_expect(lambda x: df(x) ** 2, s)
        where = f"{name} at sigma={s:g}"
        _close(m.mean[i], mean_c + c, atol=1e-13 * math.sqrt(m.second_moment[i]), rtol=0)
        np.testing.assert_allclose(m.rho[i], rho, rtol=1e-12, err_msg=where)
        np.testing.assert_allclose(m.rho_prime[i], rho_prime, rtol=1e-12, err_msg=where)
        _close(m.r_score[i], math.log(rho / rho_prime), atol=1e-12)


def test_r_score_is_never_positive_over_the_whole_sigma_range():
    # the paper's proposition, R ≤ 0, for every registered δ at every σ float64 can hold;
    # strictly < 0 for a nonlinear δ wherever R is above float64's resolution (σ ≥ 0.01).
    # At tiny σ the exact R is ~ −σ⁴, so the computed one may read a few ulps either side of 0.
    sig = np.concatenate(
        [np.geomspace(1e-150, 1e150, 31), [1e-6, 1e-2, 1.0, 100.0, 300.0, 1000.0, 1e4, 1e6]]
    )
    big = sig >= 1e-2
    bad = {}
    for name in acts.list_activations():
        r = r_score(name, sig)
        wrong = ~np.isfinite(r) | (r > 1e-15)
        if name == "identity":
            wrong |= np.abs(r) > 1e-15
        else:
            wrong |= big & ~(r < 0)
        if wrong.any():
            bad[name] = list(zip(sig[wrong].tolist(), r[wrong].tolist(), strict=True))[:3]
    assert not bad, bad


@pytest.mark.parametrize(
    "name,rho_sigma2,rho_prime_integral",
    [("tanh", 1.0, 4 / 3), ("sigmoid", 0.25, 1 / 6)],  # Var → δ(±∞) spread; ∫δ'(x)² dx
)
def test_bounded_activations_follow_their_large_sigma_asymptotics(
    name, rho_sigma2, rho_prime_integral
):
    # for σ → ∞: Var[δ] → (δ(∞) − δ(−∞))²/4, so ρ·σ² → that, and
    # ρ' = E[δ'²] → ∫δ'(x)² dx / (σ√(2π)); corrections are O(1/σ), nil at σ ≥ 1e30.
    # λ² = 1/(2ρ) + 1/(2ρ') stays finite although ρρ' underflows.
    sig = np.array([1e30, 1e100, 1e150])
    m = gaussian_moments(name, sig)
    np.testing.assert_allclose(m.rho * sig**2, rho_sigma2, rtol=1e-14)
    np.testing.assert_allclose(
        m.rho_prime * sig * math.sqrt(2 * math.pi), rho_prime_integral, rtol=1e-14
    )
    np.testing.assert_allclose(m.lam / sig, math.sqrt(0.5 / rho_sigma2), rtol=1e-14)
    _close(m.r_score, np.log(rho_sigma2 * math.sqrt(2 * math.pi) / (rho_prime_integral * sig)),
           atol=1e-12)


@pytest.mark.parametrize(
    "act,slope0", [("sigmoid", 0.25), ("softplus", 0.5), (("softplus", {"beta": 2.0}), 0.5)]
)
def test_tiny_sigma_with_nonzero_activation_at_zero(act, slope0):
    # δ(x) ≈ δ(0) + δ'(0)·x with δ(0) ≠ 0: δ(x) rounds to δ(0) for |x| ≲ 1e-16, so Var[δ]
    # is taken from δ'; ρ, ρ' → δ'(0)² (corrections O(σ²)), R → 0 from below
    sig = np.array([1e-150, 1e-60, 1e-20, 1e-9])
    m = gaussian_moments(act, sig)
    np.testing.assert_allclose(m.rho, slope0**2, rtol=1e-14)
    np.testing.assert_allclose(m.rho_prime, slope0**2, rtol=1e-14)
    _close(m.r_score, 0.0, atol=1e-15)
    np.testing.assert_allclose(m.var / sig**2, slope0**2, rtol=1e-14)


def _cube():
    return acts.Activation("cube", fn=lambda x: x**3, derivative=lambda x: 3 * x**2)


def test_moments_that_overflow_float64_are_refused():
    # δ = x³: Var = E[x⁶] = 15σ⁶, so ρ = 15σ⁴; ρ' = 9·E[x⁴] = 27σ⁴; R = ln(15/27)
    sig = np.array([1e-30, 1e-3, 1.0, 1e3, 1e40])
    m = gaussian_moments(_cube(), sig)
    np.testing.assert_allclose(m.rho / sig**4, 15.0, rtol=1e-13)
    np.testing.assert_allclose(m.rho_prime / sig**4, 27.0, rtol=1e-13)
    _close(m.r_score, math.log(15 / 27), atol=1e-13)
    # at σ = 1e60, E[δ²] = 15σ⁶ = 1.5e361 is beyond float64
    with pytest.raises(ValueError, match=r"sigma = \[1e\+60\] are not finite in float64"):
        gaussian_moments(_cube(), [1.0, 1e60])


def test_unresolvable_variance_is_refused():
    # δ = 1/2 + tanh(x)/4 is sigmoid-like: at σ = 1e-12 δ(x) − 1/2 is below δ's rounding.
    # With the exact δ' the variance comes from δ'; with a wrong δ' it cannot be had at all.
    good = acts.Activation(
        "half_tanh", fn=lambda x: 0.5 + 0.25 * torch.tanh(x),
        derivative=lambda x: 0.25 / torch.cosh(x) ** 2,
    )
    np.testing.assert_allclose(gaussian_moments(good, [1e-12, 1e-100]).rho, 1 / 16, rtol=1e-14)
    wrong = acts.Activation(
        "half_tanh", fn=good.fn, derivative=lambda x: 0.5 + 0 * x  # δ'(0) is 1/4
    )
    with pytest.raises(ValueError, match=r"not resolved in float64.*derivative"):
        gaussian_moments(wrong, 1e-12)


def test_sigma_order_and_chunking_do_not_change_the_moments(monkeypatch):
    import anact.analysis.moments as M

    rng = np.random.default_rng(0)
    sig = rng.permutation(np.geomspace(1e-150, 1e150, 41))
    want = gaussian_moments("tanh", sig)
    monkeypatch.setattr(M, "_CHUNK_NODES", 1 << 15)  # ~2 σ per chunk
    got = gaussian_moments("tanh", sig)
    # E[tanh] = 0: its rounding, relative to the size of tanh
    _close(got.mean, want.mean, atol=1e-15 * np.sqrt(want.second_moment).max())
    for field in ("second_moment", "rho", "rho_prime", "lam"):
        np.testing.assert_allclose(
            getattr(got, field), getattr(want, field), rtol=1e-14, err_msg=field
        )
    for i in (0, 17, 40):  # the batch answers what one σ at a time does
        one = gaussian_moments("tanh", float(sig[i]))
        np.testing.assert_allclose(want.rho_prime[i], one.rho_prime, rtol=1e-14)
        np.testing.assert_allclose(want.rho[i], one.rho, rtol=1e-14)
