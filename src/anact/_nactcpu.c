/* anact._nactcpu: the normalized activation's three passes over memory on CPU, float32 or
 * bfloat16 (the latter: see "bfloat16 storage" below).
 *
 * out = s·(δ(x) − b) (eq. 15) with batch statistics needs, per training step:
 *   stats    one read of x: writes y = δ(x) into the output buffer and sums, per channel,
 *            Σ(x−kx), Σ(x−kx)², Σ(y−ky), Σ(y−ky)², Σδ'(x)² (k: the channel's first element,
 *            so that variances do not cancel when the mean is large against the spread);
 *   affine   out = (y − b)·s in place once s, b exist (or from x directly in eval);
 *   backward one read of x (or of the saved output) and g: ∂L/∂x = g·δ'(x)·s and the
 *            α-gradient's partial sum Σ g·(δ(x) − b) (appendix eq. 36–37, 41–42).
 * A plain activation reads x and writes y forward, reads x, g and writes ∂L/∂x backward;
 * the extra cost here is the in-place affine pass and the reductions riding along.
 *
 * Layout: x is contiguous memory, viewed as (outer, C, inner); channel c is the strided
 * set x[o, c, :]. Per-tensor statistics are outer = C = 1. (The Python side passes a dense
 * tensor of any dimension order, e.g. channels_last, with its dimensions taken in memory
 * order around the channel.) Two loop orders:
 *   channel loops (C = 1 or inner >= ROW_INNER): row by row x[o, c, :] in memory order
 *     (each channel's rows in (o, i) order); float32 SIMD accumulators over blocks of
 *     BLOCK elements, block totals added into the channel's double totals (a walk
 *     channel by channel, jumping C·inner elements between rows, cost 15–50 % more);
 *   row loops (C > 1, inner < ROW_INNER: channels last, e.g. (N, T, C) with C in the
 *     last dimension): along memory, a span of whole rows of W = C·inner elements at a
 *     time, one float32 accumulator per position of the span (summed over ROW_FLUSH
 *     spans, then added in double), positions gathered into their channels at the end;
 *     spans wider than ROW_TILE are summed one tile of positions at a time.
 *
 * Threads: each pass may split the tensor into tasks run on threads of its own (see
 * "Drivers" below); outputs never depend on the split, sums do by float rounding.
 *
 * Element formulas are those of anact.functional's eager code, in the same order of
 * float32 operations (y − b, then ·s; g·δ', then ·s), so outputs and gradients agree
 * with it bit for bit for ReLU/LeakyReLU and within 4 ulp for Swish (whose exp is
 * computed here by a polynomial, torch's by SLEEF).
 *
 * The Python side (anact.kernels.native) checks shapes, dtypes and contiguity and passes
 * data pointers; this module trusts them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 512
/* contiguous elements per channel row below which the row loops run: measured on an
 * x86-64 core, the row loops take 1/2 to 1/6 of the channel loops' time below 64 and
 * are level at 128-256 (the span's accumulators then outgrow L1) */
#define ROW_INNER 128
#define ROW_SPAN 256  /* elements per row-loop call when a row (C·inner) is shorter */
#define ROW_FLUSH 32  /* spans summed in float32 before the double totals */
#define ROW_TILE 2048 /* positions summed at a time: a wide row is walked in tiles, so that
                         the accumulators stay in cache and small */

/* δ: must match KIND_* in anact/kernels/native.py */
enum {
    KIND_SIGN = 0,  /* δ(x) = x for x > 0, p1·x elsewhere (ReLU: p1 = 0 gives 0, keeping
                       NaN and −0 as torch.relu does); δ' = p0 for x > 0, p1 elsewhere */
    KIND_SWISH = 1, /* δ(x) = x·σ(x), δ' = σ(1 + x(1 − σ))                                */
    KINDS = 2
};

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
/* x86-64-v3: AVX2 with FMA (the polynomial of sigmoid_f32 is a chain of multiply-adds) */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE __forceinline
#endif

static inline float bits_to_float(int32_t i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}

/* bfloat16 storage: the top half of a float32. Loads are exact; stores round to nearest
 * even with NaN as 0x7FC0, as torch's float → bfloat16 conversion. */
typedef uint16_t bfloat16;

static inline float load_h(bfloat16 h) { return bits_to_float((int32_t)((uint32_t)h << 16)); }

/* f rounded to bfloat16, held in a float (one bfloat16 operation of torch: the float
 * result, then rounded), on 32-bit lanes so that loops of it stay vectorized. A NaN stays
 * a NaN without a test: NaNs here are loaded from bfloat16 (mantissa bits in the upper
 * half) or made by arithmetic (quiet bit set); store_h gives them torch's pattern. */
static inline float round_h(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return bits_to_float((int32_t)((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u));
}

static inline bfloat16 store_h(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    /* selected on 32-bit lanes, narrowed last: a 16-bit select keeps gcc from vectorizing */
    const uint32_t r = f != f ? 0x7FC00000u : u + 0x7FFFu + ((u >> 16) & 1u);
    return (bfloat16)(r >> 16);
}

/* σ(x) = 1/(1 + e^−x), branch-free so that loops of it vectorize, from t = e^−|x| ∈ [0, 1]
 * (which never overflows): σ = 1/(1 + t) for x ≥ 0, t/(1 + t) below.
 * t to about 1 ulp: −|x| = n·ln2 + r with |r| ≤ ln2/2 (ln2 in two parts), e^r by Cephes
 * expf's degree-7 polynomial, 2^n as two normal powers of two (n ∈ [−150, 0] after the
 * clamp at −104, below which t is 0 in float32: σ(x) = 0 and x·σ(x) = −0 there, as in
 * torch). A NaN x is clamped to −104 too (a defined conversion to int); its δ = x·σ and
 * δ' = σ(1 + x(1 − σ)) are NaN through x. */
static inline float sigmoid_f32(float x) {
    const float lo = -104.0f;
    const float a = -fabsf(x);
    const float ac = a > lo ? a : lo; /* NaN compares false: lo */
    float fn = ac * 1.44269504088896341f;
    fn = (fn + 12582912.0f) - 12582912.0f; /* round to nearest: |fn| < 2^22 */
    const float r = (ac - fn * 0.693359375f) - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t n = (int32_t)fn;
    const int32_t half = n >> 1;
    const float t = p * bits_to_float((half + 127) << 23) * bits_to_float((n - half + 127) << 23);
    return (x >= 0.0f ? 1.0f : t) / (1.0f + t);
}

/* Swish's δ'(x) = σ(1 + x(1 − σ)), given σ = σ(x) */
static inline float swish_derivative(float x, float sig) {
    return sig * (1.0f + x * (1.0f - sig));
}

/* the sign kinds' δ: ReLU (p1 = 0) as torch.relu (NaN and −0 stay), else LeakyReLU */
static inline float sign_fn(float x, float p1) {
    return p1 == 0.0f ? (x < 0.0f ? 0.0f : x) : (x > 0.0f ? x : x * p1);
}

/* δ(x) of one element */
static inline float act_fn(int kind, float x, float p1) {
    return kind == KIND_SWISH ? x * sigmoid_f32(x) : sign_fn(x, p1);
}

/* -------------------------------------------------------------------------------------
 * stats: y = δ(x) written, the five sums added to acc[5]
 * ------------------------------------------------------------------------------------- */

/* one element's share of the five sums (locals of stats_block) */
#define ADD_SUMS(XV, YV, DSQ)                                                             \
    {                                                                                     \
        const float xc = (XV) - kx, yc = (YV) - ky;                                       \
        sx += xc;                                                                         \
        sxx += xc * xc;                                                                   \
        sy += yc;                                                                         \
        syy += yc * yc;                                                                   \
        sg += (DSQ);                                                                      \
    }

/* one loop body for both storage types: h (bfloat16 when 1) is a constant in each of the
 * two callers, so after inlining each gets its own vectorized loop */
static ALWAYS_INLINE void stats_block_of(const void *xp, void *yp, Py_ssize_t n, int kind,
                                         float p1, float kx, float ky, double acc[5],
                                         const int h) {
    const float *restrict xf = xp;
    const bfloat16 *restrict xh = xp;
    float *restrict yf = yp;
    bfloat16 *restrict yh = yp;
    float sx = 0.0f, sxx = 0.0f, sy = 0.0f, syy = 0.0f, sg = 0.0f;
    if (kind == KIND_SWISH) {
#pragma omp simd reduction(+ : sx, sxx, sy, syy, sg)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = h ? load_h(xh[i]) : xf[i];
            const float s = sigmoid_f32(xv);
            const float yv = xv * s;
            const float d = swish_derivative(xv, s);
            if (h)
                yh[i] = store_h(yv);
            else
                yf[i] = yv;
            ADD_SUMS(xv, yv, d * d)
        }
    } else { /* the sign kinds: δ'² summed as a count of x > 0, weighted in double */
#pragma omp simd reduction(+ : sx, sxx, sy, syy, sg)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = h ? load_h(xh[i]) : xf[i];
            const float yv = sign_fn(xv, p1);
            if (h)
                yh[i] = store_h(yv);
            else
                yf[i] = yv;
            ADD_SUMS(xv, yv, xv > 0.0f ? 1.0f : 0.0f)
        }
    }
    acc[0] += sx;
    acc[1] += sxx;
    acc[2] += sy;
    acc[3] += syy;
    acc[4] += sg;
}

MULTIVERSION
static void stats_block(const float *x, float *y, Py_ssize_t n, int kind, float p1, float kx,
                        float ky, double acc[5]) {
    stats_block_of(x, y, n, kind, p1, kx, ky, acc, 0);
}

/* bfloat16 x and y: sums of the float32 values, y stored rounded (see "bfloat16") */
MULTIVERSION
static void stats_block_h(const bfloat16 *x, bfloat16 *y, Py_ssize_t n, int kind, float p1,
                          float kx, float ky, double acc[5]) {
    stats_block_of(x, y, n, kind, p1, kx, ky, acc, 1);
}

/* the sign kinds count x > 0 in Σδ'²: δ'² = p0² there and p1² elsewhere */
static void finish_sums(double *sums, Py_ssize_t C, Py_ssize_t count, int kind, float p0,
                        float p1) {
    if (kind != KIND_SIGN)
        return;
    for (Py_ssize_t c = 0; c < C; c++) {
        double *row = sums + 7 * c;
        row[4] = (double)p0 * p0 * row[4] + (double)p1 * p1 * ((double)count - row[4]);
    }
}

/* ---- row loops ----------------------------------------------------------------------
 * A span is L = W·k elements (k >= 1 whole rows of W = C·inner); position p of a span
 * belongs to channel (p mod W) / inner. Spans start at multiples of L, so every position
 * keeps its channel; the last span may be shorter (fewer rows). */

/* whether a layout takes the row loops */
static int uses_rows(Py_ssize_t C, Py_ssize_t inner) { return C > 1 && inner < ROW_INNER; }

static Py_ssize_t row_span(Py_ssize_t W) { return W >= ROW_SPAN ? W : (ROW_SPAN / W) * W; }

static Py_ssize_t channel_of(Py_ssize_t p, Py_ssize_t W, Py_ssize_t inner) {
    return (p % W) / inner;
}

/* elements of positions [j0, j0 + TW) in a span of min(left, L) elements (0 if none) */
static Py_ssize_t tile_length(Py_ssize_t left, Py_ssize_t L, Py_ssize_t j0, Py_ssize_t TW) {
    const Py_ssize_t n = (left < L ? left : L) - j0;
    return n <= 0 ? 0 : (n < TW ? n : TW);
}

/* one element's share of the five sums at position I (locals of stats_span) */
#define ADD_POSITION_SUMS(I, XV, YV, DSQ)                                                 \
    {                                                                                     \
        const float xc = (XV) - kx[I], yc = (YV) - ky[I];                                 \
        a0[I] += xc;                                                                      \
        a1[I] += xc * xc;                                                                 \
        a2[I] += yc;                                                                      \
        a3[I] += yc * yc;                                                                 \
        a4[I] += (DSQ);                                                                   \
    }

static ALWAYS_INLINE void stats_span_of(const void *xp, void *yp, Py_ssize_t n, int kind,
                                        float p1, const float *restrict kx,
                                        const float *restrict ky, float *restrict a0,
                                        float *restrict a1, float *restrict a2,
                                        float *restrict a3, float *restrict a4, const int h) {
    const float *restrict xf = xp;
    const bfloat16 *restrict xh = xp;
    float *restrict yf = yp;
    bfloat16 *restrict yh = yp;
    if (kind == KIND_SWISH) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = h ? load_h(xh[i]) : xf[i];
            const float s = sigmoid_f32(xv);
            const float yv = xv * s;
            const float d = swish_derivative(xv, s);
            if (h)
                yh[i] = store_h(yv);
            else
                yf[i] = yv;
            ADD_POSITION_SUMS(i, xv, yv, d * d)
        }
    } else {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = h ? load_h(xh[i]) : xf[i];
            const float yv = sign_fn(xv, p1);
            if (h)
                yh[i] = store_h(yv);
            else
                yf[i] = yv;
            ADD_POSITION_SUMS(i, xv, yv, xv > 0.0f ? 1.0f : 0.0f)
        }
    }
}

MULTIVERSION
static void stats_span(const float *x, float *y, Py_ssize_t n, int kind, float p1,
                       const float *kx, const float *ky, float *a0, float *a1, float *a2,
                       float *a3, float *a4) {
    stats_span_of(x, y, n, kind, p1, kx, ky, a0, a1, a2, a3, a4, 0);
}

MULTIVERSION
static void stats_span_h(const bfloat16 *x, bfloat16 *y, Py_ssize_t n, int kind, float p1,
                         const float *kx, const float *ky, float *a0, float *a1, float *a2,
                         float *a3, float *a4) {
    stats_span_of(x, y, n, kind, p1, kx, ky, a0, a1, a2, a3, a4, 1);
}

/* adds the float32 accumulators acc[0..n) into total[0..n) and clears them */
static void flush(float *acc, double *total, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        total[i] += acc[i];
        acc[i] = 0.0f;
    }
}

/* -------------------------------------------------------------------------------------
 * affine: out = (y − b)·s, y = δ(src) (apply) or src; ties nudged (see anact.functional
 * ._tie_bounds): where y > 0 and the output rounded onto t = (0 − b)·s, it becomes `away`
 * ------------------------------------------------------------------------------------- */

MULTIVERSION
static void affine_block(const float *src, float *out, Py_ssize_t n, int kind, float p1,
                         int apply, float s, float b, int nudge, float t, float away) {
    if (apply && kind == KIND_SWISH) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = src[i];
            out[i] = (xv * sigmoid_f32(xv) - b) * s;
        }
        return;
    }
#pragma omp simd
    for (Py_ssize_t i = 0; i < n; i++) {
        const float v = src[i];
        const float yv = apply ? sign_fn(v, p1) : v;
        const float o = (yv - b) * s;
        out[i] = nudge && yv > 0.0f && o == t ? away : o;
    }
}

/* the tie target t = (0 − b)·s and the value one step away from it, outward */
static float tie_target(float s, float b) { return (-b) * s; }

static float tie_away(float s, float t) {
    return s > 0.0f ? nextafterf(t, INFINITY) : s < 0.0f ? nextafterf(t, -INFINITY) : t;
}

/* affine_block with per-position s, b, t, away (row loops) */
MULTIVERSION
static void affine_span(const float *src, float *out, Py_ssize_t n, int kind, float p1,
                        int apply, const float *restrict s, const float *restrict b, int nudge,
                        const float *restrict t, const float *restrict away) {
    if (apply && kind == KIND_SWISH) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = src[i];
            out[i] = (xv * sigmoid_f32(xv) - b[i]) * s[i];
        }
        return;
    }
#pragma omp simd
    for (Py_ssize_t i = 0; i < n; i++) {
        const float v = src[i];
        const float yv = apply ? sign_fn(v, p1) : v;
        const float o = (yv - b[i]) * s[i];
        out[i] = nudge && yv > 0.0f && o == t[i] ? away[i] : o;
    }
}

/* -------------------------------------------------------------------------------------
 * backward: gx = g·δ'·s; gsum[c] += Σ g·(δ(x) − b) (from x) or Σ g·out
 * (from the output) (when gsum != NULL). From the output (sign kinds): δ' = p0 where
 * sign(out − t)·sign(s) > 0, else p1, with torch's sign (0 for NaN).
 * ------------------------------------------------------------------------------------- */

MULTIVERSION
static void backward_block(const float *restrict src, const float *restrict g,
                           float *restrict gx, Py_ssize_t n, int kind, float p0, float p1,
                           int from_output, float s, float bt, double *gsum) {
    float acc = 0.0f;
    if (from_output) {
        const float ss = (float)((s > 0.0f) - (s < 0.0f));
#pragma omp simd reduction(+ : acc)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float v = src[i], gv = g[i];
            const float dv = v - bt;
            const float sg = (float)((dv > 0.0f) - (dv < 0.0f)) * ss;
            const float d = sg > 0.0f ? p0 : p1; /* relu(sign·sign)·(p0 − p1) + p1 */
            gx[i] = gv * d * s;
            acc += gv * v;
        }
    } else if (kind == KIND_SWISH) {
#pragma omp simd reduction(+ : acc)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = src[i], gv = g[i];
            const float sig = sigmoid_f32(xv);
            const float d = swish_derivative(xv, sig);
            gx[i] = gv * d * s;
            acc += (xv * sig - bt) * gv;
        }
    } else {
#pragma omp simd reduction(+ : acc)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = src[i], gv = g[i];
            /* eager δ' = sign(x) clamped at 0 (ReLU) or where(x > 0, 1, slope): NaN → p1
             * for LeakyReLU, 0 for ReLU */
            const float d = xv > 0.0f ? p0 : p1;
            const float yv = sign_fn(xv, p1);
            gx[i] = gv * d * s;
            acc += (yv - bt) * gv;
        }
    }
    if (gsum)
        *gsum += acc;
}

/* backward_block with per-position s and bt, acc[i] += the α-gradient's term (row loops) */
MULTIVERSION
static void backward_span(const float *restrict src, const float *restrict g,
                          float *restrict gx, Py_ssize_t n, int kind, float p0, float p1,
                          int from_output, const float *restrict s, const float *restrict bt,
                          float *restrict acc) {
    if (from_output) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float v = src[i], gv = g[i], si = s[i];
            const float ss = (float)((si > 0.0f) - (si < 0.0f));
            const float dv = v - bt[i];
            const float sg = (float)((dv > 0.0f) - (dv < 0.0f)) * ss;
            const float d = sg > 0.0f ? p0 : p1;
            gx[i] = gv * d * si;
            acc[i] += gv * v;
        }
    } else if (kind == KIND_SWISH) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = src[i], gv = g[i];
            const float sig = sigmoid_f32(xv);
            const float d = swish_derivative(xv, sig);
            gx[i] = gv * d * s[i];
            acc[i] += (xv * sig - bt[i]) * gv;
        }
    } else {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = src[i], gv = g[i];
            const float d = xv > 0.0f ? p0 : p1;
            const float yv = sign_fn(xv, p1);
            gx[i] = gv * d * s[i];
            acc[i] += (yv - bt[i]) * gv;
        }
    }
}

/* =====================================================================================
 * Drivers: a pass over the whole (outer, C, inner) tensor as tasks, one per thread.
 * A task is a box of the layout: channels [c0, c1), rows [o0, o1), inner [i0, i1).
 * Channel loops split the channels when there are enough of them (no sums to add), else
 * the rows, else the inner dimension; row loops split the rows. Sums go to per-task
 * partial arrays, added in task order, so that a result depends on the number of tasks
 * but never on scheduling. Each channel's shift k (the stats sums) is its first element
 * whichever task holds it, so partial sums add as they are.
 * ===================================================================================== */

enum { PASS_STATS, PASS_AFFINE, PASS_BACKWARD };

#define MAX_TASKS 64
#define TASK_GRAIN 65536 /* elements per task at least: a thread costs tens of µs */

typedef struct {
    Py_ssize_t outer, C, inner;
    int kind, rows, ntasks;
    float p0, p1;     /* backward: δ' above and below 0 (sign kinds); else δ's slope p1 */
    float slope;      /* backward, bfloat16: δ's slope below 0 (p1 is δ' there, rounded) */
    int bf16;         /* src, dst, g hold bfloat16 (else float32) */
    const void *src;  /* stats: x; affine: δ(x) or x; backward: x or the output */
    void *dst;        /* stats: y; affine: out; backward: ∂L/∂x */
    const void *g;    /* backward: ∂L/∂out */
    const float *s;   /* affine, backward: scale per channel */
    const float *b;   /* affine: shift; backward: b (from x) or t (from the output) */
    const float *kx, *ky;
    const float *pos; /* row loops: per-position values shared by the tasks (see below) */
    int apply, nudge, from_output;
    double *partial;  /* per task: C·5 (stats) or C (backward) sums */
    int status[MAX_TASKS];
} pass_job;

typedef struct {
    Py_ssize_t c0, c1, o0, o1, i0, i1;
} box;

/* =====================================================================================
 * bfloat16 storage: the same passes on bfloat16 x, y, out, g and ∂L/∂x. Values are
 * widened to float32 (exactly), the statistics summed from them as the eager code sums
 * x.to(float32); every stored element, and every intermediate of it the eager bfloat16
 * code rounds, is rounded as torch rounds it (round_h), so that outputs and ∂L/∂x follow
 * the eager op's bfloat16 arithmetic: y = δ(x) rounded, then (y − b), then ·s; g·δ',
 * then ·s. The α-gradient's terms are summed unrounded (the eager code rounds each
 * product before its float32 sum). s, b, t (and p0, p1) arrive as bfloat16 values held
 * in floats.
 * ===================================================================================== */

/* out = (y − b)·s with y = δ(src) rounded (apply) or src, each step rounded; ties as in
 * affine_block, compared on the rounded output */
MULTIVERSION
static void affine_block_h(const bfloat16 *src, bfloat16 *out, Py_ssize_t n, int kind, float p1,
                           int apply, float s, float b, int nudge, float t, float away) {
    if (apply && kind == KIND_SWISH) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = load_h(src[i]);
            out[i] = store_h(round_h(round_h(xv * sigmoid_f32(xv)) - b) * s);
        }
        return;
    }
    /* the tie test as a select of floats: a boolean chain keeps gcc from vectorizing */
    const float t_or_nan = nudge ? t : NAN;
#pragma omp simd
    for (Py_ssize_t i = 0; i < n; i++) {
        const float v = load_h(src[i]);
        const float yv = apply ? round_h(sign_fn(v, p1)) : v;
        const float o = round_h(round_h(yv - b) * s);
        const float tie = yv > 0.0f ? t_or_nan : NAN;
        out[i] = store_h(o == tie ? away : o);
    }
}

MULTIVERSION
static void affine_span_h(const bfloat16 *src, bfloat16 *out, Py_ssize_t n, int kind, float p1,
                          int apply, const float *restrict s, const float *restrict b,
                          int nudge, const float *restrict t, const float *restrict away) {
    if (apply && kind == KIND_SWISH) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = load_h(src[i]);
            out[i] = store_h(round_h(round_h(xv * sigmoid_f32(xv)) - b[i]) * s[i]);
        }
        return;
    }
#pragma omp simd
    for (Py_ssize_t i = 0; i < n; i++) {
        const float v = load_h(src[i]);
        const float yv = apply ? round_h(sign_fn(v, p1)) : v;
        const float o = round_h(round_h(yv - b[i]) * s[i]);
        const float tie = nudge && yv > 0.0f ? t[i] : NAN; /* as in affine_block_h */
        out[i] = store_h(o == tie ? away[i] : o);
    }
}

/* Swish's δ' as the eager bfloat16 code forms it: σ rounded, then (1 − σ), ·x, +1, ·σ */
static inline float swish_derivative_h(float x, float sig_h) {
    return round_h(round_h(round_h(round_h(1.0f - sig_h) * x) + 1.0f) * sig_h);
}

/* gx = (g·δ')·s rounded twice; the α-term g·(δ(x) − b) (or g·out) in float */
MULTIVERSION
static void backward_block_h(const bfloat16 *restrict src, const bfloat16 *restrict g,
                             bfloat16 *restrict gx, Py_ssize_t n, int kind, float p0, float p1,
                             float slope, int from_output, float s, float bt, double *gsum) {
    float acc = 0.0f;
    if (from_output) {
        const float ss = (float)((s > 0.0f) - (s < 0.0f));
#pragma omp simd reduction(+ : acc)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float v = load_h(src[i]), gv = load_h(g[i]);
            const float dv = v - bt;
            const float sg = (float)((dv > 0.0f) - (dv < 0.0f)) * ss;
            const float d = sg > 0.0f ? p0 : p1;
            gx[i] = store_h(round_h(gv * d) * s);
            acc += gv * v;
        }
    } else if (kind == KIND_SWISH) {
#pragma omp simd reduction(+ : acc)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = load_h(src[i]), gv = load_h(g[i]);
            const float sig = sigmoid_f32(xv);
            const float d = swish_derivative_h(xv, round_h(sig));
            gx[i] = store_h(round_h(gv * d) * s);
            acc += (xv * sig - bt) * gv;
        }
    } else {
#pragma omp simd reduction(+ : acc)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = load_h(src[i]), gv = load_h(g[i]);
            const float d = xv > 0.0f ? p0 : p1;
            gx[i] = store_h(round_h(gv * d) * s);
            acc += (sign_fn(xv, slope) - bt) * gv;
        }
    }
    if (gsum)
        *gsum += acc;
}

MULTIVERSION
static void backward_span_h(const bfloat16 *restrict src, const bfloat16 *restrict g,
                            bfloat16 *restrict gx, Py_ssize_t n, int kind, float p0, float p1,
                            float slope, int from_output, const float *restrict s,
                            const float *restrict bt, float *restrict acc) {
    if (from_output) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float v = load_h(src[i]), gv = load_h(g[i]), si = s[i];
            const float ss = (float)((si > 0.0f) - (si < 0.0f));
            const float dv = v - bt[i];
            const float sg = (float)((dv > 0.0f) - (dv < 0.0f)) * ss;
            const float d = sg > 0.0f ? p0 : p1;
            gx[i] = store_h(round_h(gv * d) * si);
            acc[i] += gv * v;
        }
    } else if (kind == KIND_SWISH) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = load_h(src[i]), gv = load_h(g[i]);
            const float sig = sigmoid_f32(xv);
            const float d = swish_derivative_h(xv, round_h(sig));
            gx[i] = store_h(round_h(gv * d) * s[i]);
            acc[i] += (xv * sig - bt[i]) * gv;
        }
    } else {
#pragma omp simd
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = load_h(src[i]), gv = load_h(g[i]);
            const float d = xv > 0.0f ? p0 : p1;
            gx[i] = store_h(round_h(gv * d) * s[i]);
            acc[i] += (sign_fn(xv, slope) - bt[i]) * gv;
        }
    }
}

/* a bfloat16 t's neighbour away from it in the direction of sign(s) (t itself for s = 0,
 * ±inf and NaN): nextafter in bfloat16 */
static float tie_away_h(float s, float t) {
    const int up = s > 0.0f;
    if (s == 0.0f || t != t || (isinf(t) && (t > 0.0f) == up))
        return t;
    if (t == 0.0f)
        return load_h(up ? 0x0001u : 0x8001u);
    const bfloat16 h = store_h(t);
    return load_h((bfloat16)(((t > 0.0f) == up) ? h + 1 : h - 1));
}

/* the tie target t = (0 − b)·s of an output of the storage type and its neighbour away */
static void ties(int bf16, float s, float b, float *t, float *away) {
    *t = bf16 ? round_h(tie_target(s, b)) : tie_target(s, b);
    *away = bf16 ? tie_away_h(s, *t) : tie_away(s, *t);
}

/* ---- the passes on either storage type, at element offset `at` of the job's tensors ---- */

/* pointers into the job's tensors at element offset `at`, by storage type */
#define SRC_F(j, at) ((const float *)(j)->src + (at))
#define SRC_H(j, at) ((const bfloat16 *)(j)->src + (at))
#define DST_F(j, at) ((float *)(j)->dst + (at))
#define DST_H(j, at) ((bfloat16 *)(j)->dst + (at))
#define G_F(j, at) ((const float *)(j)->g + (at))
#define G_H(j, at) ((const bfloat16 *)(j)->g + (at))

static void stats_block_at(const pass_job *j, Py_ssize_t at, Py_ssize_t n, float kx, float ky,
                           double acc[5]) {
    if (j->bf16)
        stats_block_h(SRC_H(j, at), DST_H(j, at), n, j->kind, j->p1, kx, ky, acc);
    else
        stats_block(SRC_F(j, at), DST_F(j, at), n, j->kind, j->p1, kx, ky, acc);
}

static void stats_span_at(const pass_job *j, Py_ssize_t at, Py_ssize_t n,
                          const float *kx, const float *ky, float *a0, float *a1, float *a2,
                          float *a3, float *a4) {
    if (j->bf16)
        stats_span_h(SRC_H(j, at), DST_H(j, at), n, j->kind, j->p1, kx, ky, a0, a1, a2, a3,
                     a4);
    else
        stats_span(SRC_F(j, at), DST_F(j, at), n, j->kind, j->p1, kx, ky, a0, a1, a2, a3, a4);
}

static void affine_block_at(const pass_job *j, Py_ssize_t at, Py_ssize_t n, float s, float b,
                            float t, float away) {
    if (j->bf16)
        affine_block_h(SRC_H(j, at), DST_H(j, at), n, j->kind, j->p1, j->apply, s, b,
                       j->nudge, t, away);
    else
        affine_block(SRC_F(j, at), DST_F(j, at), n, j->kind, j->p1, j->apply, s, b, j->nudge,
                     t, away);
}

static void affine_span_at(const pass_job *j, Py_ssize_t at, Py_ssize_t n, const float *s,
                           const float *b, const float *t, const float *away) {
    if (j->bf16)
        affine_span_h(SRC_H(j, at), DST_H(j, at), n, j->kind, j->p1, j->apply, s, b,
                      j->nudge, t, away);
    else
        affine_span(SRC_F(j, at), DST_F(j, at), n, j->kind, j->p1, j->apply, s, b, j->nudge,
                    t, away);
}

static void backward_block_at(const pass_job *j, Py_ssize_t at, Py_ssize_t n, float s,
                              float bt, double *gsum) {
    if (j->bf16)
        backward_block_h(SRC_H(j, at), G_H(j, at), DST_H(j, at), n, j->kind, j->p0, j->p1,
                         j->slope, j->from_output, s, bt, gsum);
    else
        backward_block(SRC_F(j, at), G_F(j, at), DST_F(j, at), n, j->kind, j->p0, j->p1,
                       j->from_output, s, bt, gsum);
}

static void backward_span_at(const pass_job *j, Py_ssize_t at, Py_ssize_t n, const float *s,
                             const float *bt, float *acc) {
    if (j->bf16)
        backward_span_h(SRC_H(j, at), G_H(j, at), DST_H(j, at), n, j->kind, j->p0, j->p1,
                        j->slope, j->from_output, s, bt, acc);
    else
        backward_span(SRC_F(j, at), G_F(j, at), DST_F(j, at), n, j->kind, j->p0, j->p1,
                      j->from_output, s, bt, acc);
}

/* [a, b) of task t out of T over n, chunk boundaries on multiples of align */
static void split(Py_ssize_t n, int T, int t, Py_ssize_t align, Py_ssize_t *a, Py_ssize_t *b) {
    Py_ssize_t chunk = (n + T - 1) / T;
    chunk = (chunk + align - 1) / align * align;
    *a = (Py_ssize_t)t * chunk < n ? (Py_ssize_t)t * chunk : n;
    *b = *a + chunk < n ? *a + chunk : n;
}

/* how the tasks split the layout: 'c' channels, 'o' rows, 'i' inner. Channels only when
 * there are enough to balance the tasks (the last one may get fewer), or nothing else
 * splits. */
static char split_dim(const pass_job *j, int T) {
    if (j->rows)
        return 'o';
    if (j->C >= 4 * T)
        return 'c';
    if (j->outer >= T)
        return 'o';
    return (j->inner + BLOCK - 1) / BLOCK >= T ? 'i' : 'c';
}

static box task_box(const pass_job *j, int t) {
    box r = {0, j->C, 0, j->outer, 0, j->inner};
    switch (split_dim(j, j->ntasks)) {
    case 'c': split(j->C, j->ntasks, t, 1, &r.c0, &r.c1); break;
    case 'o': split(j->outer, j->ntasks, t, 1, &r.o0, &r.o1); break;
    default: split(j->inner, j->ntasks, t, BLOCK, &r.i0, &r.i1); break;
    }
    return r;
}

static int count_tasks(const pass_job *j, int threads) {
    const Py_ssize_t numel = j->outer * j->C * j->inner;
    Py_ssize_t T = threads < MAX_TASKS ? threads : MAX_TASKS;
    if (numel / TASK_GRAIN < T)
        T = numel / TASK_GRAIN;
    if (T <= 1)
        return 1;
    const char d = split_dim(j, (int)T);
    const Py_ssize_t units = d == 'c' ? j->C : d == 'o' ? j->outer
                                               : (j->inner + BLOCK - 1) / BLOCK;
    return (int)(units < T ? units : T);
}

/* ---- stats ---------------------------------------------------------------------------
 * row loops' pos: kx, ky per position (2L) */

static void stats_task(pass_job *j, int t) {
    const box r = task_box(j, t);
    const Py_ssize_t C = j->C, inner = j->inner;
    double *part = j->partial + (Py_ssize_t)t * C * 5;
    if (!j->rows) { /* in memory order, each channel's blocks summed in (o, i) order into
                       this task's zeroed partial sums */
        for (Py_ssize_t o = r.o0; o < r.o1; o++)
            for (Py_ssize_t c = r.c0; c < r.c1; c++) {
                const Py_ssize_t base = (o * C + c) * inner;
                for (Py_ssize_t i = r.i0; i < r.i1; i += BLOCK) {
                    const Py_ssize_t len = r.i1 - i < BLOCK ? r.i1 - i : BLOCK;
                    stats_block_at(j, base + i, len, j->kx[c], j->ky[c], part + 5 * c);
                }
            }
        return;
    }
    const Py_ssize_t W = C * inner, L = row_span(W), TW = L < ROW_TILE ? L : ROW_TILE;
    float *a = calloc((size_t)(5 * TW), sizeof *a);
    double *d = malloc((size_t)(5 * TW) * sizeof *d);
    if (!a || !d) {
        free(a);
        free(d);
        j->status[t] = -1;
        return;
    }
    const float *kx = j->pos, *ky = j->pos + L;
    for (Py_ssize_t j0 = 0; j0 < L; j0 += TW) { /* positions [j0, j0 + TW) of every span */
        memset(d, 0, (size_t)(5 * TW) * sizeof *d);
        int spans = 0;
        for (Py_ssize_t start = r.o0 * W; start < r.o1 * W; start += L) {
            const Py_ssize_t n = tile_length(r.o1 * W - start, L, j0, TW);
            stats_span_at(j, start + j0, n, kx + j0, ky + j0, a, a + TW, a + 2 * TW,
                          a + 3 * TW, a + 4 * TW);
            if (++spans == ROW_FLUSH) {
                flush(a, d, 5 * TW);
                spans = 0;
            }
        }
        flush(a, d, 5 * TW);
        for (Py_ssize_t p = 0; p < TW && j0 + p < L; p++)
            for (int k = 0; k < 5; k++)
                part[channel_of(j0 + p, W, inner) * 5 + k] += d[k * TW + p];
    }
    free(a);
    free(d);
}

/* ---- affine ----------------------------------------------------------------------------
 * row loops' pos: s, b, t, away per position (4L) */

static void affine_task(pass_job *j, int t) {
    const box r = task_box(j, t);
    const Py_ssize_t C = j->C, inner = j->inner;
    if (!j->rows) { /* in memory order; each channel's tie values computed once */
        const Py_ssize_t nc = r.c1 - r.c0;
        float *tie = malloc((size_t)(2 * nc) * sizeof *tie);
        if (!tie) {
            j->status[t] = -1;
            return;
        }
        for (Py_ssize_t c = r.c0; c < r.c1; c++)
            ties(j->bf16, j->s[c], j->b[c], &tie[c - r.c0], &tie[nc + c - r.c0]);
        for (Py_ssize_t o = r.o0; o < r.o1; o++)
            for (Py_ssize_t c = r.c0; c < r.c1; c++) {
                const Py_ssize_t base = (o * C + c) * inner + r.i0;
                affine_block_at(j, base, r.i1 - r.i0, j->s[c], j->b[c], tie[c - r.c0],
                                tie[nc + c - r.c0]);
            }
        free(tie);
        return;
    }
    const Py_ssize_t W = C * inner, L = row_span(W);
    const float *pos = j->pos;
    for (Py_ssize_t start = r.o0 * W; start < r.o1 * W; start += L) {
        const Py_ssize_t n = r.o1 * W - start < L ? r.o1 * W - start : L;
        affine_span_at(j, start, n, pos, pos + L, pos + 2 * L, pos + 3 * L);
    }
}

/* ---- backward --------------------------------------------------------------------------
 * row loops' pos: s, bt per position (2L) */

static void backward_task(pass_job *j, int t) {
    const box r = task_box(j, t);
    const Py_ssize_t C = j->C, inner = j->inner;
    double *part = j->partial + (Py_ssize_t)t * C;
    if (!j->rows) { /* in memory order, each channel's blocks summed in (o, i) order into
                       this task's zeroed partial sums */
        for (Py_ssize_t o = r.o0; o < r.o1; o++)
            for (Py_ssize_t c = r.c0; c < r.c1; c++) {
                const Py_ssize_t base = (o * C + c) * inner;
                for (Py_ssize_t i = r.i0; i < r.i1; i += BLOCK) {
                    const Py_ssize_t len = r.i1 - i < BLOCK ? r.i1 - i : BLOCK;
                    backward_block_at(j, base + i, len, j->s[c], j->b[c], part + c);
                }
            }
        return;
    }
    const Py_ssize_t W = C * inner, L = row_span(W);
    const Py_ssize_t TW = L < ROW_TILE ? L : ROW_TILE;
    float *acc = calloc((size_t)TW, sizeof *acc);
    double *d = malloc((size_t)TW * sizeof *d);
    if (!acc || !d) {
        free(acc);
        free(d);
        j->status[t] = -1;
        return;
    }
    for (Py_ssize_t j0 = 0; j0 < L; j0 += TW) { /* positions [j0, j0 + TW) of every span */
        memset(d, 0, (size_t)TW * sizeof *d);
        int spans = 0;
        for (Py_ssize_t start = r.o0 * W; start < r.o1 * W; start += L) {
            const Py_ssize_t n = tile_length(r.o1 * W - start, L, j0, TW), o = start + j0;
            backward_span_at(j, o, n, j->pos + j0, j->pos + L + j0, acc);
            if (++spans == ROW_FLUSH) {
                flush(acc, d, TW);
                spans = 0;
            }
        }
        flush(acc, d, TW);
        for (Py_ssize_t p = 0; p < TW && j0 + p < L; p++)
            part[channel_of(j0 + p, W, inner)] += d[p];
    }
    free(acc);
    free(d);
}

/* ---- threads ---------------------------------------------------------------------------- */

typedef void (*task_fn)(pass_job *, int);

#ifndef _WIN32
#include <pthread.h>

typedef struct {
    pass_job *job;
    task_fn fn;
    int t;
} task_arg;

static void *task_main(void *p) {
    task_arg *a = p;
    a->fn(a->job, a->t);
    return NULL;
}

/* ---- torch's OpenMP team ------------------------------------------------------------
 * torch's own ops run in the OpenMP team of the libgomp that torch loaded; after each
 * parallel region its workers spin for a while, and threads of our own would compete
 * with them for the cores (measured: a 2-thread pass right after a torch op took
 * 1.5 ms more). So the passes run in that same team when it can be found: the loaded
 * OpenMP runtime's GOMP_parallel (libgomp's entry point, which LLVM's and Intel's
 * runtimes also export), looked up without loading anything (RTLD_NOLOAD). The team's
 * threads claim tasks from a shared counter; the caller is one of them. Elsewhere,
 * pthreads of our own (below). */
#include <dlfcn.h>
#include <stdatomic.h>

typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_fn gomp_parallel = NULL;
static int team_enabled = 1;

static const char *const OPENMP_RUNTIMES[] = {"libgomp.so.1", "libiomp5.so", "libomp.so",
                                              "libomp.so.5", "libgomp.1.dylib",
                                              "libomp.dylib", "libiomp5.dylib"};

#if defined(__linux__)
#include <link.h>
/* an already loaded runtime under another file name (e.g. a wheel's libgomp-<hash>.so.1) */
static int find_loaded(struct dl_phdr_info *info, size_t size, void *out) {
    (void)size;
    const char *name = info->dlpi_name, *base = name ? strrchr(name, '/') : NULL;
    base = base ? base + 1 : name;
    if (!base || !(strncmp(base, "libgomp", 7) == 0 || strncmp(base, "libiomp", 7) == 0 ||
                   strncmp(base, "libomp", 6) == 0))
        return 0;
    void *h = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
    if (h && (*(void **)out = dlsym(h, "GOMP_parallel")))
        return 1;
    return 0;
}
#endif

static gomp_parallel_fn find_gomp_parallel(void) {
    void *fn = NULL;
    for (size_t i = 0; !fn && i < sizeof OPENMP_RUNTIMES / sizeof *OPENMP_RUNTIMES; i++) {
        void *h = dlopen(OPENMP_RUNTIMES[i], RTLD_LAZY | RTLD_NOLOAD);
        if (h)
            fn = dlsym(h, "GOMP_parallel");
    }
#if defined(__linux__)
    if (!fn)
        dl_iterate_phdr(find_loaded, &fn);
#endif
    return (gomp_parallel_fn)fn;
}

typedef struct {
    pass_job *job;
    task_fn fn;
    atomic_int next;
} team_arg;

static void team_main(void *p) {
    team_arg *a = p;
    int t;
    while ((t = atomic_fetch_add(&a->next, 1)) < a->job->ntasks)
        a->fn(a->job, t);
}

/* runs fn(job, 0..ntasks-1): in torch's OpenMP team when there is one (tasks claimed in
 * turn), else task t on a thread of its own, task 0 on the calling thread (a thread that
 * cannot be started runs its task on the calling thread). Which thread runs a task never
 * changes what it computes: each task sums into its own partial array. */
static void run_tasks(pass_job *j, task_fn fn) {
    if (j->ntasks > 1 && team_enabled && gomp_parallel) {
        team_arg a = {j, fn, 0};
        gomp_parallel(team_main, &a, (unsigned)j->ntasks, 0);
        return;
    }
    pthread_t th[MAX_TASKS];
    task_arg args[MAX_TASKS];
    int started[MAX_TASKS] = {0};
    for (int t = 1; t < j->ntasks; t++) {
        args[t] = (task_arg){j, fn, t};
        started[t] = pthread_create(&th[t], NULL, task_main, &args[t]) == 0;
    }
    fn(j, 0);
    for (int t = 1; t < j->ntasks; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        else
            fn(j, t);
    }
}
#else
static void run_tasks(pass_job *j, task_fn fn) {
    for (int t = 0; t < j->ntasks; t++)
        fn(j, t);
}
#endif

/* sets up the job's tasks and partial sums (n_sums per channel and task), runs fn;
 * returns 0, or -1 when out of memory */
/* the loop order and the number of tasks of a pass (also reported by plan()) */
static void plan_tasks(pass_job *j, int threads) {
    j->rows = uses_rows(j->C, j->inner);
    j->ntasks = count_tasks(j, threads);
}

static int run_pass(pass_job *j, int threads, int n_sums, task_fn fn) {
    plan_tasks(j, threads);
    memset(j->status, 0, sizeof j->status);
    j->partial = NULL;
    if (n_sums && !(j->partial = calloc((size_t)(j->ntasks * j->C * n_sums), sizeof(double))))
        return -1;
    run_tasks(j, fn);
    for (int t = 0; t < j->ntasks; t++)
        if (j->status[t] < 0)
            return -1;
    return 0;
}

/* per-position copies of per-channel values for the row loops: out[k·L + p] = in_k[c(p)] */
static float *positions(const pass_job *j, const float *const *in, int n) {
    const Py_ssize_t W = j->C * j->inner, L = row_span(W);
    float *out = malloc((size_t)(n * L) * sizeof *out);
    if (out)
        for (int k = 0; k < n; k++)
            for (Py_ssize_t p = 0; p < L; p++)
                out[k * L + p] = in[k][channel_of(p, W, j->inner)];
    return out;
}

static int stats_impl(int bf16, const void *x, void *y, Py_ssize_t outer, Py_ssize_t C,
                      Py_ssize_t inner, int kind, float p0, float p1, double *sums,
                      int threads) {
    pass_job j = {.outer = outer, .C = C, .inner = inner, .kind = kind, .p0 = p0, .p1 = p1,
                  .bf16 = bf16, .src = x, .dst = y};
    float *k = malloc((size_t)(2 * C) * sizeof *k);
    if (!k)
        return -1;
    for (Py_ssize_t c = 0; c < C; c++) { /* each channel's first element */
        k[c] = bf16 ? load_h(((const bfloat16 *)x)[c * inner]) : ((const float *)x)[c * inner];
        k[C + c] = act_fn(kind, k[c], p1);
    }
    j.kx = k;
    j.ky = k + C;
    const float *per_channel[2] = {j.kx, j.ky};
    float *pos = NULL;
    if (uses_rows(C, inner) && !(pos = positions(&j, per_channel, 2))) {
        free(k);
        return -1;
    }
    j.pos = pos;
    int rc = run_pass(&j, threads, 5, stats_task);
    if (rc == 0) {
        for (Py_ssize_t c = 0; c < C; c++) {
            double *row = sums + 7 * c;
            for (int q = 0; q < 5; q++) {
                row[q] = 0.0;
                for (int t = 0; t < j.ntasks; t++)
                    row[q] += j.partial[(t * C + c) * 5 + q];
            }
            row[5] = k[c];
            row[6] = k[C + c];
        }
        finish_sums(sums, C, outer * inner, kind, p0, p1);
    }
    free(j.partial);
    free(pos);
    free(k);
    return rc;
}

static int affine_impl(int bf16, const void *src, void *out, Py_ssize_t outer, Py_ssize_t C,
                       Py_ssize_t inner, int kind, float p1, int apply, const float *s,
                       const float *b, int nudge, int threads) {
    pass_job j = {.outer = outer, .C = C, .inner = inner, .kind = kind, .p1 = p1,
                  .bf16 = bf16, .src = src, .dst = out, .s = s, .b = b, .apply = apply,
                  .nudge = nudge};
    float *pos = NULL, *tie = NULL;
    if (uses_rows(C, inner)) {
        if (!(tie = malloc((size_t)(2 * C) * sizeof *tie)))
            return -1;
        for (Py_ssize_t c = 0; c < C; c++)
            ties(bf16, s[c], b[c], &tie[c], &tie[C + c]);
        const float *per_channel[4] = {s, b, tie, tie + C};
        if (!(pos = positions(&j, per_channel, 4))) {
            free(tie);
            return -1;
        }
    }
    j.pos = pos;
    const int rc = run_pass(&j, threads, 0, affine_task);
    free(pos);
    free(tie);
    return rc;
}

static int backward_impl(int bf16, const void *src, const void *g, void *gx,
                         Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner, int kind, float p0,
                         float p1, float slope, int from_output, const float *s,
                         const float *bt, double *gsum, double *gsum0, int threads) {
    pass_job j = {.outer = outer, .C = C, .inner = inner, .kind = kind, .p0 = p0, .p1 = p1,
                  .slope = slope, .bf16 = bf16, .src = src, .dst = gx, .g = g, .s = s, .b = bt,
                  .from_output = from_output};
    float *pos = NULL;
    const float *per_channel[2] = {s, bt};
    if (uses_rows(C, inner) && !(pos = positions(&j, per_channel, 2)))
        return -1;
    j.pos = pos;
    const int rc = run_pass(&j, threads, 1, backward_task);
    if (rc == 0)
        for (Py_ssize_t c = 0; c < (gsum ? C : 1); c++) {
            double total = 0.0;
            for (int t = 0; t < j.ntasks; t++)
                total += j.partial[t * C + c];
            if (gsum)
                gsum[c] = total;
            if (c == 0)
                *gsum0 = total;
        }
    free(j.partial);
    free(pos);
    return rc;
}

/* -------------------------------------------------------------------------------------
 * Python entry points
 * ------------------------------------------------------------------------------------- */

#define GIL_FREE_FROM 65536 /* elements: long enough to let other Python threads run */

static int check_layout(const char *name, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                        int kind, int threads) {
    if (outer < 1 || C < 1 || inner < 1) {
        PyErr_Format(PyExc_ValueError, "%s: outer, C, inner must be >= 1, got %zd, %zd, %zd",
                     name, outer, C, inner);
        return 0;
    }
    if (kind < 0 || kind >= KINDS) {
        PyErr_Format(PyExc_ValueError, "%s: unknown kind %d", name, kind);
        return 0;
    }
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "%s: threads must be >= 1, got %d", name, threads);
        return 0;
    }
    return 1;
}

#define PTR(T, p) ((T *)(uintptr_t)(p))
/* runs CALL (0, or -1 when out of memory), without the GIL from GIL_FREE_FROM elements */
#define RUN(n, CALL)                                                                     \
    {                                                                                    \
        int rc_;                                                                         \
        if ((n) >= GIL_FREE_FROM) {                                                      \
            Py_BEGIN_ALLOW_THREADS rc_ = CALL;                                           \
            Py_END_ALLOW_THREADS                                                         \
        } else {                                                                         \
            rc_ = CALL;                                                                  \
        }                                                                                \
        if (rc_ < 0)                                                                     \
            return PyErr_NoMemory();                                                     \
    }

PyDoc_STRVAR(stats_doc,
"stats(x_ptr, y_ptr, outer, C, inner, kind, p0, p1, sums_ptr, threads=1, bf16=False)\n\n"
"y = δ(x) into y_ptr; per channel the row (Σ(x-kx), Σ(x-kx)²,\n"
"Σ(y-ky), Σ(y-ky)², Σδ'², kx, ky) into sums_ptr (C×7 float64).\n"
"threads: at most this many threads (from 65536 elements per thread).\n"
"bf16: x and y hold bfloat16 (else float32); the sums are of their float32 values.");

static PyObject *py_stats(PyObject *self, PyObject *args) {
    unsigned long long xp, yp, sp;
    Py_ssize_t outer, C, inner;
    int kind, threads = 1, bf16 = 0;
    double p0, p1;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnnniddK|ip:stats", &xp, &yp, &outer, &C, &inner, &kind, &p0,
                          &p1, &sp, &threads, &bf16))
        return NULL;
    if (!check_layout("stats", outer, C, inner, kind, threads))
        return NULL;
    if (!xp || !yp || !sp) {
        PyErr_SetString(PyExc_ValueError, "stats: x, y and sums are required");
        return NULL;
    }
    RUN(outer * C * inner, stats_impl(bf16, PTR(const void, xp), PTR(void, yp), outer, C,
                                      inner, kind, (float)p0, (float)p1, PTR(double, sp),
                                      threads))
    Py_RETURN_NONE;
}

PyDoc_STRVAR(affine_doc,
"affine(src_ptr, out_ptr, outer, C, inner, kind, p1, apply, s_ptr, b_ptr, nudge,\n"
"       threads=1, bf16=False)\n\n"
"out = (y - b)·s per channel, y = δ(src) (apply) or src (src_ptr may be out_ptr);\n"
"s, b: C float32. nudge: move outputs with y > 0 that rounded onto (0 - b)·s.\n"
"bf16: src and out hold bfloat16, s and b bfloat16 values; each step rounded.");

static PyObject *py_affine(PyObject *self, PyObject *args) {
    unsigned long long srcp, outp, sp, bp;
    Py_ssize_t outer, C, inner;
    int kind, apply, nudge, threads = 1, bf16 = 0;
    double p1;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnnnidpKKp|ip:affine", &srcp, &outp, &outer, &C, &inner,
                          &kind, &p1, &apply, &sp, &bp, &nudge, &threads, &bf16))
        return NULL;
    if (!check_layout("affine", outer, C, inner, kind, threads))
        return NULL;
    if (!srcp || !outp || !sp || !bp) {
        PyErr_SetString(PyExc_ValueError, "affine: src, out, s and b are required");
        return NULL;
    }
    RUN(outer * C * inner,
        affine_impl(bf16, PTR(const void, srcp), PTR(void, outp), outer, C, inner, kind,
                    (float)p1, apply, PTR(const float, sp), PTR(const float, bp), nudge,
                    threads))
    Py_RETURN_NONE;
}

PyDoc_STRVAR(backward_doc,
"backward(src_ptr, g_ptr, gx_ptr, outer, C, inner, kind, p0, p1, from_output, s_ptr,\n"
"         bt_ptr, gsum_ptr, threads=1, bf16=False) -> gsum0\n\n"
"gx = g·δ'·s into gx_ptr; gsum[c] = Σ g·(δ(x) - b) from x, or Σ g·out\n"
"from the output (gsum_ptr 0: not written). bt: b (from x) or t = (0 - b)·s (from the\n"
"output), C float32; gsum: C float64. Returns channel 0's sum (per tensor: the sum).\n"
"bf16: src, g, gx hold bfloat16, s and bt bfloat16 values; each step rounded.");

static PyObject *py_backward(PyObject *self, PyObject *args) {
    unsigned long long srcp, gp, gxp, sp, btp, gsp;
    Py_ssize_t outer, C, inner;
    int kind, from_output, threads = 1, bf16 = 0;
    double p0, p1;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKnnniddpKKK|ip:backward", &srcp, &gp, &gxp, &outer, &C,
                          &inner, &kind, &p0, &p1, &from_output, &sp, &btp, &gsp, &threads,
                          &bf16))
        return NULL;
    if (!check_layout("backward", outer, C, inner, kind, threads))
        return NULL;
    if (!srcp || !gp || !gxp || !sp || !btp) {
        PyErr_SetString(PyExc_ValueError, "backward: src, g, gx, s and bt are required");
        return NULL;
    }
    if (from_output && kind != KIND_SIGN) {
        PyErr_SetString(PyExc_ValueError, "backward: from_output needs the sign kind");
        return NULL;
    }
    /* δ' above 0 and below as the eager code forms them in the storage type:
     * 1·(p0 − p1) + p1 and 0·(p0 − p1) + p1, each operation rounded */
    const float above = bf16 ? round_h(round_h((float)(p0 - p1)) + (float)p1)
                             : (float)(p0 - p1) + (float)p1;
    const float below = bf16 ? round_h((float)p1) : (float)p1;
    double gsum0 = 0.0;
    RUN(outer * C * inner,
        backward_impl(bf16, PTR(const void, srcp), PTR(const void, gp), PTR(void, gxp), outer,
                      C, inner, kind, above, below, (float)p1, from_output, PTR(const float, sp),
                      PTR(const float, btp), PTR(double, gsp), &gsum0, threads))
    return PyFloat_FromDouble(gsum0);
}

/* -------------------------------------------------------------------------------------
 * finish: the statistics from the sums, the running update and λ, per channel
 * ------------------------------------------------------------------------------------- */

/* Double arithmetic in the order of anact.functional's float rules, without fused
 * multiply-adds (whose single rounding would change last bits against them). */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif

typedef struct {
    double max, eps, tiny; /* finfo of the statistics' dtype */
    int f64;               /* statistics in float64 (else rounded to float32 as stored) */
} stat_type;

static inline double as_stat(const stat_type *t, double v) {
    return t->f64 ? v : (double)(float)v;
}

static inline double read_value(const void *p, int f64, Py_ssize_t c) {
    return f64 ? ((const double *)p)[c] : (double)((const float *)p)[c];
}

/* stores v rounded to the buffer's dtype; returns what was stored */
static inline double write_value(void *p, int f64, Py_ssize_t c, double v) {
    if (f64) {
        ((double *)p)[c] = v;
        return v;
    }
    const float f = (float)v;
    ((float *)p)[c] = f;
    return (double)f;
}

/* λ = sqrt((ρ + ρ')/(2ρρ')) (eq. 13), ρ and ρ' floored at eps (NaN eps: none); IEEE
 * results for zeros, infinities and NaN, as the tensor version's */
NO_CONTRACT static double lambda_of(double rho, double rho_prime, double eps) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    if (eps == eps) { /* clamp_min: NaN stays NaN */
        rho = (rho != rho || rho >= eps) ? rho : eps;
        rho_prime = (rho_prime != rho_prime || rho_prime >= eps) ? rho_prime : eps;
    }
    const double num = rho + rho_prime, den = 2.0 * rho * rho_prime;
    double q;
    if (den == 0.0)
        q = num != 0.0 ? copysign(INFINITY, num) * copysign(1.0, den) : NAN;
    else
        q = num / den;
    return q >= 0.0 ? sqrt(q) : NAN;
}

/* eq. 16–18 for one running value: the batch value on the first batch, else kept when
 * outside the bounds (ρ, ρ' only), else blended with momentum m */
NO_CONTRACT static double blend_value(double run, double batch, int first, int filtered,
                                      int bounded, double lo, double hi, double m) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    if (first)
        return batch;
    if (filtered && bounded && !(lo * run < batch && batch < hi * run))
        return run;
    return run + m * (batch - run);
}

/* One channel's batch statistics from its C-row of sums: ρ_M, ρ'_M, μ_M (eq. 31) and
 * whether the batch defines them (functional.moments_to_stats' rules) */
NO_CONTRACT static int channel_stats(const double *row, double count, const stat_type *t,
                                     double *rho, double *rho_prime, double *mu) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    const double sx = row[0], sxx = row[1], sy = row[2], syy = row[3], sg = row[4];
    const double mx = sx / count, my = sy / count;
    double var_x = sxx / count - mx * mx, var_y = syy / count - my * my;
    var_x = var_x < 0.0 ? 0.0 : var_x; /* clamp_min(0): NaN stays */
    var_y = var_y < 0.0 ? 0.0 : var_y;
    const double mean_x = as_stat(t, row[5] + mx), mean_y = as_stat(t, row[6] + my);
    var_x = as_stat(t, var_x);
    var_y = as_stat(t, var_y);
    const double dsq = as_stat(t, sy == sy ? sg / count : NAN); /* NaN in x: NaN moments */
    const double r = var_x != 0.0 ? var_y / var_x : (var_y == 0.0 ? NAN : INFINITY);
    const double spread = 4.0 * t->eps * fabs(mean_x);
    const int constant = var_x <= spread * spread + t->tiny;
    *rho = r;
    *rho_prime = dsq;
    *mu = mean_y;
    return as_stat(t, count) >= 2.0 && !constant && fabs(r) <= t->max && fabs(dsq) <= t->max &&
           fabs(mean_y) <= t->max && r > 0.0 && dsq > 0.0;
}

PyDoc_STRVAR(finish_doc,
"finish(sums_ptr, C, count, stat_f64, rr_ptr, rrp_ptr, rm_ptr, run_f64, nbt_ptr,\n"
"       nbt_per_channel, training, momentum, bounded, lo, hi, eps, center, lam_ptr,\n"
"       lam_f64, shift_ptr, shift_f64) -> (invalid, lam0, shift0)\n\n"
"What the affine pass normalizes with, per channel, from the C×7 sums of stats()\n"
"(sums_ptr 0: none, eval with the running values): the batch statistics; in training\n"
"with running values (rr_ptr, rrp_ptr, rm_ptr: C floats or doubles, nbt_ptr: int64,\n"
"one count, raised when any channel is usable, or C counts with nbt_per_channel,\n"
"each raised when its channel is usable: first batch and cumulative average per\n"
"channel) their update (eq. 16-18; momentum NaN: cumulative average), normalizing with the\n"
"values stored; without running values the batch's (λ = 1, μ = 0 where unusable).\n"
"Writes λ (eq. 13; eps NaN: no floor) and the shift (μ, or 0 without center) into\n"
"lam_ptr, shift_ptr (0: not written). Returns the number of channels whose batch\n"
"could not define the statistics and channel 0's λ and shift.");

static PyObject *py_finish(PyObject *self, PyObject *args) {
    unsigned long long sp, rrp, rrpp, rmp, nbtp, lamp, shiftp;
    Py_ssize_t C;
    double count, momentum, lo, hi, eps;
    int stat_f64, run_f64, per_channel, training, bounded, center, lam_f64, shift_f64;
    (void)self;
    if (!PyArg_ParseTuple(args, "KndpKKKpKppdpdddpKpKp:finish", &sp, &C, &count, &stat_f64,
                          &rrp, &rrpp, &rmp, &run_f64, &nbtp, &per_channel, &training,
                          &momentum, &bounded, &lo, &hi, &eps, &center, &lamp, &lam_f64,
                          &shiftp, &shift_f64))
        return NULL;
    const int has_running = rrp && rrpp && rmp && nbtp;
    if (C < 1 || (!sp && !has_running) || ((rrp || rrpp || rmp || nbtp) && !has_running)) {
        PyErr_SetString(PyExc_ValueError,
                        "finish: C >= 1, and the sums or all four running buffers, are needed");
        return NULL;
    }
    const stat_type t = stat_f64 ? (stat_type){DBL_MAX, DBL_EPSILON, DBL_MIN, 1}
                                 : (stat_type){FLT_MAX, FLT_EPSILON, FLT_MIN, 0};
    int64_t *nbt = PTR(int64_t, nbtp);
    const int update = sp && has_running && training;
    const int64_t seen_all = has_running ? *nbt : 0;
    Py_ssize_t invalid = 0;
    double lam0 = 0.0, shift0 = 0.0;
    for (Py_ssize_t c = 0; c < C; c++) {
        double rho, rho_prime, mu;
        if (sp) {
            const int valid = channel_stats(PTR(const double, sp) + 7 * c, count, &t, &rho,
                                            &rho_prime, &mu);
            invalid += !valid;
            if (update) { /* normalize with the running values, updated when valid */
                const int64_t seen = per_channel ? nbt[c] : seen_all;
                const double m = momentum == momentum ? momentum : 1.0 / (double)(seen + 1);
                void *rr = PTR(void, rrp), *rrq = PTR(void, rrpp), *rm = PTR(void, rmp);
                const double run_rho = read_value(rr, run_f64, c);
                const double run_rho_prime = read_value(rrq, run_f64, c);
                const double run_mean = read_value(rm, run_f64, c);
                if (valid) {
                    const int first = seen == 0;
                    rho = write_value(rr, run_f64, c, blend_value(run_rho, rho, first, 1, bounded,
                                                                  lo, hi, m));
                    rho_prime = write_value(rrq, run_f64, c,
                                            blend_value(run_rho_prime, rho_prime, first, 1,
                                                        bounded, lo, hi, m));
                    mu = write_value(rm, run_f64, c,
                                     blend_value(run_mean, mu, first, 0, bounded, lo, hi, m));
                    if (per_channel)
                        nbt[c] = seen + 1;
                } else {
                    rho = run_rho;
                    rho_prime = run_rho_prime;
                    mu = run_mean;
                }
            } else if (!valid) { /* no running values to fall back on */
                rho = rho_prime = 1.0;
                mu = 0.0;
            }
        } else {
            rho = read_value(PTR(void, rrp), run_f64, c);
            rho_prime = read_value(PTR(void, rrpp), run_f64, c);
            mu = read_value(PTR(void, rmp), run_f64, c);
        }
        const double lam = lambda_of(rho, rho_prime, eps), shift = center ? mu : 0.0;
        const double lam_s = lamp ? write_value(PTR(void, lamp), lam_f64, c, lam) : lam;
        const double shift_s = shiftp ? write_value(PTR(void, shiftp), shift_f64, c, shift)
                                      : shift;
        if (c == 0) {
            lam0 = lam_s;
            shift0 = shift_s;
        }
    }
    if (update && !per_channel && invalid < C)
        *nbt = seen_all + 1; /* a batch counts when any channel could use it */
    return Py_BuildValue("(ndd)", invalid, lam0, shift0);
}

PyDoc_STRVAR(plan_doc,
"plan(outer, C, inner, threads) -> (tasks, split, rows)\n\n"
"How a pass over this layout is run: the number of tasks (threads), the dimension\n"
"they split ('c' channels, 'o' rows, 'i' inner) and whether the row loops run.");

static PyObject *py_plan(PyObject *self, PyObject *args) {
    Py_ssize_t outer, C, inner;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnni:plan", &outer, &C, &inner, &threads))
        return NULL;
    if (!check_layout("plan", outer, C, inner, 0, threads))
        return NULL;
    pass_job j = {.outer = outer, .C = C, .inner = inner};
    plan_tasks(&j, threads);
    const char d = split_dim(&j, j.ntasks);
    return Py_BuildValue("(iCO)", j.ntasks, d, j.rows ? Py_True : Py_False);
}

PyDoc_STRVAR(team_doc,
             "team(enable=None) -> bool\n\n"
             "Whether passes on several threads run in the loaded OpenMP runtime's team "
             "(torch's), rather than on threads of their own; enable=True/False turns "
             "that on or off (True needs a loaded runtime).");

static PyObject *py_team(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *enable = Py_None;
    if (!PyArg_ParseTuple(args, "|O:team", &enable))
        return NULL;
#ifndef _WIN32
    if (!gomp_parallel)
        gomp_parallel = find_gomp_parallel();
    if (enable != Py_None) {
        const int on = PyObject_IsTrue(enable);
        if (on < 0)
            return NULL;
        team_enabled = on;
    }
    return PyBool_FromLong(team_enabled && gomp_parallel != NULL);
#else
    (void)enable;
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"team", py_team, METH_VARARGS, team_doc},
    {"plan", py_plan, METH_VARARGS, plan_doc},
    {"stats", py_stats, METH_VARARGS, stats_doc},
    {"affine", py_affine, METH_VARARGS, affine_doc},
    {"backward", py_backward, METH_VARARGS, backward_doc},
    {"finish", py_finish, METH_VARARGS, finish_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "anact._nactcpu",
    "The normalized activation's passes over float32 CPU memory (private; see "
    "anact.kernels.native).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__nactcpu(void) {
#ifndef _WIN32
    gomp_parallel = find_gomp_parallel(); /* torch is imported first (anact/__init__.py) */
#endif
    return PyModule_Create(&module);
}
