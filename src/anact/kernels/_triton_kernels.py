"""Triton kernels of :mod:`anact.kernels.triton_passes` (imported only when that module
runs one; needs the ``triton`` package).

Layout: the kernels address x's memory as (outer, C, inner) around the channel (per
tensor: 1, 1, numel). A statistic's elements are the positions r in [0, outer·inner) of
its channel c, at memory offset (r // inner)·C·inner + c·inner + r % inner. Each
program takes a tile of BLOCK_R positions × BLOCK_C channels; LAYOUT says which of the
three index forms applies (per tensor: r; channels last, inner = 1: r·C + c; else the
general one with a division).
"""

import triton
import triton.language as tl

# KIND as anact.kernels.native's KIND_SIGN (0), KIND_SWISH (1); LAYOUT as
# triton_passes.LAYOUT_FLAT (0), LAYOUT_LAST (1), LAYOUT_GENERAL (2)


@triton.jit
def _act(x, KIND: tl.constexpr, p0, p1):
    """(δ(x), δ'(x)) in float32, as the eager registry functions and the C passes."""
    if KIND == 1:  # Swish: δ = x·σ(x), δ' = σ(1 + x(1 − σ))
        sig = tl.sigmoid(x)
        y = x * sig
        d = sig * (1.0 + x * (1.0 - sig))
    else:  # sign kinds: ReLU (p1 = 0) keeps NaN and −0 as torch.relu; else LeakyReLU
        y = tl.where(p1 == 0.0, tl.where(x < 0.0, 0.0, x), tl.where(x > 0.0, x, x * p1))
        d = tl.where(x > 0.0, p0, p1)
    return y, d


@triton.jit
def _storable(v, STORE: tl.constexpr):
    """float32 v rounded to the storage dtype (STORE: 0 float32, 1 bfloat16, 2 float16)
    and held in float32: what a store keeps, and s, μ as the eager op casts them. bfloat16
    is rounded here to nearest, ties to even (NaN kept), so that the cast at a store is
    exact on every backend (a GPU rounds so itself; Triton's interpreter truncates)."""
    if STORE == 1:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    elif STORE == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _next_after(t, up, STORE: tl.constexpr):
    """The storage-dtype value next to t (a storage value held in float32) toward +inf
    where ``up``, else toward −inf (torch.nextafter in that dtype, for finite t)."""
    if STORE == 2:
        bits = t.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        step, tiny_neg = 1, -32767  # 0x8001: −(smallest subnormal)
    elif STORE == 1:
        bits = t.to(tl.int32, bitcast=True)
        step, tiny_neg = 0x10000, -2147418112  # 0x80010000
    else:
        bits = t.to(tl.int32, bitcast=True)
        step, tiny_neg = 1, -2147483647  # 0x80000001
    # sign and magnitude: away from 0 is +step where t moves in its own sign's direction
    moved = tl.where(t == 0.0, tl.where(up, step, tiny_neg),
                     tl.where((t > 0.0) == up, bits + step, bits - step))
    if STORE == 2:
        return moved.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return moved.to(tl.float32, bitcast=True)


@triton.jit
def _tile(pid_r, pid_c, R, C, inner, LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """Memory offsets (int64), in-bounds mask and channel indices of one tile."""
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < R)[:, None] & (c < C)[None, :]
    r64 = r.to(tl.int64)
    c64 = c.to(tl.int64)
    if LAYOUT == 0:
        offs = r64[:, None] + c64[None, :] * 0
    elif LAYOUT == 1:
        offs = r64[:, None] * C + c64[None, :]
    else:
        o = r // inner  # int32: R < 2**31 (checked by the caller)
        i = r - o * inner
        offs = (o.to(tl.int64) * C * inner + i.to(tl.int64))[:, None] + c64[None, :] * inner
    return offs, mask, c


@triton.jit
def stats_kernel(x_ptr, part_ptr, pilot_ptr, R, C, inner, p0, p1, KIND: tl.constexpr,
                 LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward pass 1: per tile and channel, Σ(x−kx), Σ(x−kx)², Σ(y−ky), Σ(y−ky)², Σδ'²
    into part[pid_r, c, 0:5] (float32); kx = the channel's first element, ky = δ(kx)
    (into pilot[c, 0:2], by the first row of tiles)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs, mask, c = _tile(pid_r, pid_c, R, C, inner, LAYOUT, BLOCK_R, BLOCK_C)
    cmask = c < C
    c64 = c.to(tl.int64)
    kx = tl.load(x_ptr + c64 * inner, mask=cmask, other=0.0).to(tl.float32)
    ky, _ = _act(kx, KIND, p0, p1)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y, d = _act(x, KIND, p0, p1)
    xc = tl.where(mask, x - kx[None, :], 0.0)
    yc = tl.where(mask, y - ky[None, :], 0.0)
    dd = tl.where(mask, d * d, 0.0)
    row = part_ptr + (pid_r.to(tl.int64) * C + c64) * 5
    tl.store(row + 0, tl.sum(xc, axis=0), mask=cmask)
    tl.store(row + 1, tl.sum(xc * xc, axis=0), mask=cmask)
    tl.store(row + 2, tl.sum(yc, axis=0), mask=cmask)
    tl.store(row + 3, tl.sum(yc * yc, axis=0), mask=cmask)
    tl.store(row + 4, tl.sum(dd, axis=0), mask=cmask)
    if pid_r == 0:
        tl.store(pilot_ptr + c64 * 2, kx, mask=cmask)
        tl.store(pilot_ptr + c64 * 2 + 1, ky, mask=cmask)


@triton.jit
def finish_kernel(part_ptr, pilot_ptr, P, C, count, const_ptr, rr_ptr, rrp_ptr, rm_ptr,
                  nbt_ptr, lam_ptr, shift_ptr, bad_ptr, HAS_BATCH: tl.constexpr,
                  HAS_RUNNING: tl.constexpr, TRAINING: tl.constexpr,
                  CUMULATIVE: tl.constexpr, HAS_BOUNDS: tl.constexpr,
                  COUNT_PER_CHANNEL: tl.constexpr, CENTER: tl.constexpr,
                  HAS_EPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The statistics' step, one program over all channels, in float64: the partial
    sums reduced → batch moments → ρ_M, ρ'_M, μ_M and their guards (eq. 31,
    ``moments_to_stats``) → the running update (eq. 16–18) → λ (eq. 13) and the shift.

    const = (momentum, low, high, eps, float32 eps, float32 tiny, float32 max) as
    float64. The moments are rounded to float32 (the statistics' dtype) before use, as
    the tensor rules and ``_nactcpu.finish`` hold them. Writes lam[c], shift[c] (their
    tensors' dtypes), the running buffers in place, and bad[0] = the number of channels
    whose batch was unusable."""
    momentum = tl.load(const_ptr + 0)
    low = tl.load(const_ptr + 1)
    high = tl.load(const_ptr + 2)
    eps = tl.load(const_ptr + 3)
    eps32 = tl.load(const_ptr + 4)
    tiny32 = tl.load(const_ptr + 5)
    max32 = tl.load(const_ptr + 6)
    n = count.to(tl.float64)
    bad = tl.zeros([BLOCK_C], dtype=tl.int32)
    good = tl.zeros([BLOCK_C], dtype=tl.int32)
    nbt0 = tl.load(nbt_ptr) if HAS_RUNNING else 0
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        c64 = c.to(tl.int64)
        if HAS_BATCH:
            s0 = tl.zeros([BLOCK_C], dtype=tl.float64)
            s1 = tl.zeros([BLOCK_C], dtype=tl.float64)
            s2 = tl.zeros([BLOCK_C], dtype=tl.float64)
            s3 = tl.zeros([BLOCK_C], dtype=tl.float64)
            s4 = tl.zeros([BLOCK_C], dtype=tl.float64)
            for q0 in range(0, P, BLOCK_P):
                q = q0 + tl.arange(0, BLOCK_P)
                m = (q < P)[:, None] & cm[None, :]
                idx = (q.to(tl.int64)[:, None] * C + c64[None, :]) * 5
                s0 += tl.sum(tl.load(part_ptr + idx, mask=m, other=0.0).to(tl.float64), 0)
                s1 += tl.sum(tl.load(part_ptr + idx + 1, mask=m, other=0.0).to(tl.float64), 0)
                s2 += tl.sum(tl.load(part_ptr + idx + 2, mask=m, other=0.0).to(tl.float64), 0)
                s3 += tl.sum(tl.load(part_ptr + idx + 3, mask=m, other=0.0).to(tl.float64), 0)
                s4 += tl.sum(tl.load(part_ptr + idx + 4, mask=m, other=0.0).to(tl.float64), 0)
            kx = tl.load(pilot_ptr + c64 * 2, mask=cm, other=0.0).to(tl.float64)
            ky = tl.load(pilot_ptr + c64 * 2 + 1, mask=cm, other=0.0).to(tl.float64)
            mx = s0 / n
            my = s2 / n
            # E[(x−k)²] − E[x−k]², floored at 0 (a NaN stays NaN)
            var_x = s1 / n - mx * mx
            var_x = tl.where(var_x < 0.0, 0.0, var_x)
            var_y = s3 / n - my * my
            var_y = tl.where(var_y < 0.0, 0.0, var_y)
            # the moments as float32 holds them (inf where they overflow it)
            var_x = var_x.to(tl.float32).to(tl.float64)
            var_y = var_y.to(tl.float32).to(tl.float64)
            mean_x = (kx + mx).to(tl.float32).to(tl.float64)
            mean_y = (ky + my).to(tl.float32).to(tl.float64)
            dsq = tl.where(s2 != s2, s2, s4 / n)  # a NaN in x is a NaN in every moment
            dsq = dsq.to(tl.float32).to(tl.float64)
            # not constant: a spread above a few ulps of the mean (a NaN fails below)
            limit = 4.0 * eps32 * tl.abs(mean_x)
            spread = var_x > limit * limit + tiny32
            rho_b = var_y / tl.where(spread, var_x, 1.0)  # ρ_M (eq. 31), used where valid
            # finite in float32 (as a float32 quotient would be); count >= 2 holds:
            # plan_call takes no smaller statistic
            valid = (spread & (tl.abs(rho_b) <= max32) & (tl.abs(dsq) <= max32)
                     & (tl.abs(mean_y) <= max32) & (rho_b > 0.0) & (dsq > 0.0))
            bad += tl.where(cm, tl.where(valid, 0, 1), 0)
            good += tl.where(cm, tl.where(valid, 1, 0), 0)
            if HAS_RUNNING and TRAINING:
                if COUNT_PER_CHANNEL:
                    nbt = tl.load(nbt_ptr + c64, mask=cm, other=1)
                else:
                    nbt = nbt0 + c64 * 0
                first = nbt == 0
                if CUMULATIVE:
                    mom = 1.0 / (nbt + 1).to(tl.float64)
                else:
                    mom = momentum
                rr = tl.load(rr_ptr + c64, mask=cm, other=1.0)
                rrp = tl.load(rrp_ptr + c64, mask=cm, other=1.0)
                rm = tl.load(rm_ptr + c64, mask=cm, other=0.0)
                run_rho = rr.to(tl.float64)
                run_rhop = rrp.to(tl.float64)
                run_mu = rm.to(tl.float64)
                # the batch values in the buffers' dtype, then m·new + (1 − m)·run (eq. 16)
                new_rho = rho_b.to(rr.dtype).to(tl.float64)
                new_rhop = dsq.to(rr.dtype).to(tl.float64)
                new_mu = mean_y.to(rr.dtype).to(tl.float64)
                up_rho = run_rho + mom * (new_rho - run_rho)
                up_rhop = run_rhop + mom * (new_rhop - run_rhop)
                up_mu = run_mu + mom * (new_mu - run_mu)
                if HAS_BOUNDS:  # eq. 17–18: ρ, ρ' move only inside (L·run, U·run)
                    up_rho = tl.where((low * run_rho < new_rho) & (new_rho < high * run_rho),
                                      up_rho, run_rho)
                    up_rhop = tl.where(
                        (low * run_rhop < new_rhop) & (new_rhop < high * run_rhop),
                        up_rhop, run_rhop)
                up_rho = tl.where(valid, tl.where(first, new_rho, up_rho), run_rho)
                up_rhop = tl.where(valid, tl.where(first, new_rhop, up_rhop), run_rhop)
                up_mu = tl.where(valid, tl.where(first, new_mu, up_mu), run_mu)
                rr = up_rho.to(rr.dtype)
                rrp = up_rhop.to(rrp.dtype)
                rm = up_mu.to(rm.dtype)
                tl.store(rr_ptr + c64, rr, mask=cm)
                tl.store(rrp_ptr + c64, rrp, mask=cm)
                tl.store(rm_ptr + c64, rm, mask=cm)
                if COUNT_PER_CHANNEL:
                    tl.store(nbt_ptr + c64, nbt + tl.where(valid, 1, 0), mask=cm)
                rho = rr.to(tl.float64)
                rhop = rrp.to(tl.float64)
                mu = rm.to(tl.float64)
            else:  # no running values to fall back on: λ = 1, μ = 0 where unusable
                rho = tl.where(valid, rho_b, 1.0)
                rhop = tl.where(valid, dsq, 1.0)
                mu = tl.where(valid, mean_y, 0.0)
        else:  # eval: the running values
            rho = tl.load(rr_ptr + c64, mask=cm, other=1.0).to(tl.float64)
            rhop = tl.load(rrp_ptr + c64, mask=cm, other=1.0).to(tl.float64)
            mu = tl.load(rm_ptr + c64, mask=cm, other=0.0).to(tl.float64)
        if HAS_EPS:
            rho = tl.where(rho < eps, eps, rho)
            rhop = tl.where(rhop < eps, eps, rhop)
        lam = tl.sqrt((rho + rhop) / (2.0 * rho * rhop))  # eq. 13
        tl.store(lam_ptr + c64, lam.to(lam_ptr.dtype.element_ty), mask=cm)
        if CENTER:
            shift = mu
        else:  # zeros, whatever μ holds (inf, NaN)
            shift = tl.zeros([BLOCK_C], dtype=tl.float64)
        tl.store(shift_ptr + c64, shift.to(shift_ptr.dtype.element_ty), mask=cm)
    if HAS_BATCH and HAS_RUNNING and TRAINING and not COUNT_PER_CHANNEL:
        tl.store(nbt_ptr, nbt0 + tl.where(tl.sum(good, 0) > 0, 1, 0))
    tl.store(bad_ptr, tl.sum(bad, 0))


@triton.jit
def affine_kernel(x_ptr, out_ptr, s_ptr, b_ptr, R, C, inner, p0, p1, KIND: tl.constexpr,
                  NUDGE: tl.constexpr, STORE: tl.constexpr, LAYOUT: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward pass 2: out = (δ(x) − b)·s (eq. 15), s and b cast to the storage dtype
    first as the eager op casts them. With NUDGE (the output-saving ReLU), outputs with
    δ(x) > 0 are clamped to the storage values next to t = (0 − b)·s on their side,
    which moves only those that would round onto t (anact.functional._tie_bounds)."""
    offs, mask, c = _tile(tl.program_id(0), tl.program_id(1), R, C, inner, LAYOUT,
                          BLOCK_R, BLOCK_C)
    cmask = c < C
    s = _storable(tl.load(s_ptr + c, mask=cmask, other=0.0), STORE)
    b = _storable(tl.load(b_ptr + c, mask=cmask, other=0.0), STORE)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y, _ = _act(x, KIND, p0, p1)
    out = (y - b[None, :]) * s[None, :]
    if NUDGE:
        t = _storable(-b * s, STORE)
        lo = tl.where(s > 0.0, _next_after(t, s > 0.0, STORE), -float("inf"))
        hi = tl.where(s < 0.0, _next_after(t, s > 0.0, STORE), float("inf"))
        clamped = tl.where(out < lo[None, :], lo[None, :], out)
        clamped = tl.where(clamped > hi[None, :], hi[None, :], clamped)
        out = tl.where(y > 0.0, clamped, out)
    tl.store(out_ptr + offs, _storable(out, STORE).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_kernel(src_ptr, g_ptr, gx_ptr, part_ptr, s_ptr, b_ptr, R, C, inner, p0, p1,
                    KIND: tl.constexpr, FROM_OUTPUT: tl.constexpr, NEED_X: tl.constexpr,
                    NEED_SCALE: tl.constexpr, STORE: tl.constexpr, LAYOUT: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward: ∂L/∂x = g·δ'·s and per tile and channel the ∂L/∂s partial sum
    Σ g·(δ(x) − b) (from x) or Σ g·out (from the output, where δ' = p0 where
    sign(out − t)·sign(s) > 0, else p1, with t = (0 − b)·s as the forward stored it),
    appendix eq. 36–37, 41–42; s, b cast to the storage dtype as in the forward."""
    pid_r = tl.program_id(0)
    offs, mask, c = _tile(pid_r, tl.program_id(1), R, C, inner, LAYOUT, BLOCK_R, BLOCK_C)
    cmask = c < C
    s = _storable(tl.load(s_ptr + c, mask=cmask, other=0.0), STORE)
    b = _storable(tl.load(b_ptr + c, mask=cmask, other=0.0), STORE)
    v = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FROM_OUTPUT:
        dv = v - _storable(-b * s, STORE)[None, :]
        sign_s = tl.where(s > 0.0, 1.0, tl.where(s < 0.0, -1.0, 0.0))
        sign_dv = tl.where(dv > 0.0, 1.0, tl.where(dv < 0.0, -1.0, 0.0))  # 0 for NaN
        d = tl.where(sign_dv * sign_s[None, :] > 0.0, p0, p1)
        term = g * v
    else:
        y, d = _act(v, KIND, p0, p1)
        term = g * (y - b[None, :])
    if NEED_X:
        gx = g * d * s[None, :]
        tl.store(gx_ptr + offs, _storable(gx, STORE).to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_SCALE:
        term = tl.where(mask, term, 0.0)
        tl.store(part_ptr + pid_r.to(tl.int64) * C + c, tl.sum(term, axis=0), mask=cmask)
