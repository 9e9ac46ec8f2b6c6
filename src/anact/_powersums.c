/* anact._powersums: one-pass power sums of float32 CPU tensors (the training monitor, and
 * the eager batch statistics of a normalized activation on CPU).
 *
 * ConvergenceMonitor needs, for every plain activation layer and every step,
 * Σx, Σx², Σy, Σy² of the layer's input x and output y and Σδ'(x)², the last taken
 * from y where the activation allows it (ReLU: 1[y > 0], tanh: 1 − y², ...). Eager
 * PyTorch spends one call and one pass over memory per sum (and a written temporary
 * for δ'); this module reads x and y once, in one call, with the GIL released.
 *
 * Accuracy: float32 SIMD accumulators over blocks of BLOCK elements (at most
 * BLOCK / lanes sequential additions per lane), block totals added in double:
 * relative error ~1e-7; ReLU's and LeakyReLU's δ'² come from exact counts.
 *
 * The Python wrapper (anact.analysis.monitors) passes data pointers of contiguous
 * float32 CPU tensors it has checked; this module trusts them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 512
#define SWISH_TINY 1e-20f /* must match _SWISH_TINY in anact/analysis/monitors.py */

/* where Σδ'² comes from: must match DSQ_* in anact/_native.py */
enum {
    DSQ_NONE = 0,      /* no δ'                                                       */
    DSQ_SIGN_Y = 1,    /* δ' = p0 where y > 0, p1 elsewhere (ReLU: 1, 0; LeakyReLU, slope
                          a ≥ 0: 1, a): counts y > 0, adds p0²·count + p1²·rest in double */
    DSQ_TANH_Y = 2,    /* δ' = 1 − y²                                                  */
    DSQ_SIGMOID_Y = 3, /* δ' = y(1 − y)                                                */
    DSQ_ELU_Y = 4,     /* ELU/SELU (α = p0, scale = p1): scale (y > 0), y + scale·α      */
    DSQ_SWISH_XY = 5,  /* σ = y/x (1/2 for |x| < 1e-20), δ' = σ + y(1 − σ)             */
    DSQ_SIGN_X = 6,    /* δ' = p0 where x > 0, p1 elsewhere, as DSQ_SIGN_Y               */
    DSQ_KINDS = 7
};

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

/* the five sums of one block (n ≤ BLOCK) in float32 (an absent x or y reads zeros) */
#define BLOCK_LOOP(G_EXPR)                                                        \
    for (Py_ssize_t i = 0; i < n; i++) {                                          \
        const float xv = x[i];                                                    \
        const float yv = y[i];                                                    \
        const float g = (G_EXPR);                                                 \
        const float xc = xv - kx, yc = yv - ky;                                   \
        sx += xc;                                                                 \
        sxx += xc * xc;                                                           \
        sy += yc;                                                                 \
        syy += yc * yc;                                                           \
        sg += g * g;                                                              \
    }

MULTIVERSION
static void block_sums(const float *restrict x, const float *restrict y, Py_ssize_t n,
                       int kind, float p0, float p1, float kx, float ky, double acc[5]) {
    float sx = 0.0f, sxx = 0.0f, sy = 0.0f, syy = 0.0f, sg = 0.0f;
    switch (kind) {
    case DSQ_SIGN_Y: { /* the count of y > 0 (power_sums weights it by p0², p1²) */
#pragma omp simd reduction(+ : sx, sxx, sy, syy, sg)
        BLOCK_LOOP(yv > 0.0f ? 1.0f : 0.0f)
        break;
    }
    case DSQ_TANH_Y: {
#pragma omp simd reduction(+ : sx, sxx, sy, syy, sg)
        BLOCK_LOOP(1.0f - yv * yv)
        break;
    }
    case DSQ_SIGMOID_Y: {
#pragma omp simd reduction(+ : sx, sxx, sy, syy, sg)
        BLOCK_LOOP(yv * (1.0f - yv))
        break;
    }
    case DSQ_ELU_Y: {
        const float neg = p1 * p0;
#pragma omp simd reduction(+ : sx, sxx, sy, syy, sg)
        BLOCK_LOOP(yv > 0.0f ? p1 : yv + neg)
        break;
    }
    case DSQ_SWISH_XY: {
#pragma omp simd reduction(+ : sx, sxx, sy, syy, sg)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xv = x[i], yv = y[i];
            /* σ(x) = 1/2 to float32 precision for |x| < 1e-20, where y/x would be 0/0 or
             * lose the subnormal y's precision; NaN (inf/inf) → 1/2 like the torch twin */
            float s = fabsf(xv) < SWISH_TINY ? 0.5f : yv / xv;
            s = (s != s) ? 0.5f : s;
            const float g = s + yv * (1.0f - s);
            const float xc = xv - kx, yc = yv - ky;
            sx += xc;
            sxx += xc * xc;
            sy += yc;
            syy += yc * yc;
            sg += g * g;
        }
        break;
    }
    case DSQ_SIGN_X: { /* the count of x > 0, as DSQ_SIGN_Y */
#pragma omp simd reduction(+ : sx, sxx, sy, syy, sg)
        BLOCK_LOOP(xv > 0.0f ? 1.0f : 0.0f)
        break;
    }
    default: { /* DSQ_NONE */
#pragma omp simd reduction(+ : sx, sxx, sy, syy)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float xc = x[i] - kx, yc = y[i] - ky;
            sx += xc;
            sxx += xc * xc;
            sy += yc;
            syy += yc * yc;
        }
        break;
    }
    }
    acc[0] += sx;
    acc[1] += sxx;
    acc[2] += sy;
    acc[3] += syy;
    acc[4] += sg;
}

static const float zeros[BLOCK]; /* what an absent x or y reads: branch-free loops */

static void power_sums_impl(const float *x, const float *y, Py_ssize_t n, int kind,
                            float p0, float p1, float kx, float ky, double acc[5]) {
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        const Py_ssize_t len = n - start < BLOCK ? n - start : BLOCK;
        block_sums(x ? x + start : zeros, y ? y + start : zeros, len, kind, p0, p1, kx, ky,
                   acc);
    }
}

static int needs_x(int kind) { return kind >= DSQ_SWISH_XY; }

static int needs_y(int kind) { return kind >= DSQ_SIGN_Y && kind <= DSQ_SWISH_XY; }

PyDoc_STRVAR(power_sums_doc,
"power_sums(x_ptr, y_ptr, n, kind, p0, p1, shifted)\n"
"    -> (Σ(x-kx), Σ(x-kx)², Σ(y-ky), Σ(y-ky)², Σδ'², kx, ky)\n\n"
"Sums over n float32 elements at the data pointers x_ptr and y_ptr (0: absent,\n"
"its sums are 0). kind picks δ' (see DSQ_* in anact._native); p0, p1\n"
"are its parameters. shifted=0: kx = ky = 0; shifted=1: kx = x[0], ky = y[0], so\n"
"that variances from the sums do not cancel when the mean is large against the\n"
"spread. Private: the caller guarantees contiguous float32 memory.");

static PyObject *power_sums(PyObject *self, PyObject *args) {
    unsigned long long xp, yp;
    Py_ssize_t n;
    int kind;
    double p0, p1;
    (void)self;
    int shifted = 0;
    if (!PyArg_ParseTuple(args, "KKnidd|p:power_sums", &xp, &yp, &n, &kind, &p0, &p1,
                          &shifted))
        return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "power_sums: n must be >= 0, got %zd", n);
        return NULL;
    }
    if (kind < 0 || kind >= DSQ_KINDS) {
        PyErr_Format(PyExc_ValueError, "power_sums: unknown kind %d", kind);
        return NULL;
    }
    if (n > 0 && ((needs_x(kind) && !xp) || (needs_y(kind) && !yp))) {
        PyErr_Format(PyExc_ValueError, "power_sums: kind %d needs %s", kind,
                     needs_x(kind) && !xp ? "x" : "y");
        return NULL;
    }
    const float *x = (const float *)(uintptr_t)xp;
    const float *y = (const float *)(uintptr_t)yp;
    double acc[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    const float kx = shifted && x && n > 0 ? x[0] : 0.0f;
    const float ky = shifted && y && n > 0 ? y[0] : 0.0f;
    if (n >= 65536) { /* long enough to let other Python threads (data loaders) run */
        Py_BEGIN_ALLOW_THREADS
        power_sums_impl(x, y, n, kind, (float)p0, (float)p1, kx, ky, acc);
        Py_END_ALLOW_THREADS
    } else {
        power_sums_impl(x, y, n, kind, (float)p0, (float)p1, kx, ky, acc);
    }
    if (kind == DSQ_SIGN_Y || kind == DSQ_SIGN_X) /* δ'² = p0² (counted) or p1² (the rest) */
        acc[4] = p0 * p0 * acc[4] + p1 * p1 * ((double)n - acc[4]);
    return Py_BuildValue("(ddddddd)", acc[0], acc[1], acc[2], acc[3], acc[4], (double)kx,
                         (double)ky);
}

static PyMethodDef methods[] = {
    {"power_sums", power_sums, METH_VARARGS, power_sums_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "anact._powersums",
    "One-pass power sums of float32 CPU tensors (private; see anact.analysis.monitors).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__powersums(void) { return PyModule_Create(&module); }
