/* The CPU averaging kernel of warm-hub: out = round(sum_i w_i * x_i), one pass over the inputs.
 *
 * Same arithmetic as the Triton kernel (kernels/weighted_average.py) and the torch path
 * (warm_hub/averaging.py): fp32 accumulation in ingredient order, acc = w0*x0 then acc = fma(w_i, x_i, acc),
 * and one round-to-nearest-even store (NaN stored as the canonical quiet NaN). Where torch runs some ten
 * passes per block of elements (a conversion, a multiply, an add per input, a check, a store), this reads each
 * input once into an L1-resident accumulator and checks finiteness while it stores: about 3x less CPU time.
 *
 * Built as `warm_hub._cpu_average`. Python calls `average(out_address, out_dtype, inputs, weights, count)`,
 * which runs with the GIL released; the caller (warm_hub.averaging) owns the memory and has checked devices,
 * dtypes, alignment, contiguity and sizes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define BLOCK 2048          /* elements: an 8 KiB fp32 accumulator, in L1 */
#define MAX_INPUTS 1024

#if defined(__FLT16_MAX__)
#define HAVE_F16 1
typedef _Float16 f16_t;
#else
#define HAVE_F16 0
#endif

/* Compiled twice on x86-64 Linux (AVX2+FMA+F16C and baseline), chosen when the module loads. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* acc[j] = w * x[j] (first input) or fma(w, x[j], acc[j]). */
MULTIVERSION
static void accumulate(float *restrict acc, const void *x, int dtype, float w, size_t n, int first) {
    size_t j;
    if (dtype == BF16) {
        const uint16_t *restrict p = (const uint16_t *)x;
        if (first)
            for (j = 0; j < n; j++) acc[j] = w * bf16_to_f32(p[j]);
        else
            for (j = 0; j < n; j++) acc[j] = __builtin_fmaf(w, bf16_to_f32(p[j]), acc[j]);
    } else if (dtype == F32) {
        const float *restrict p = (const float *)x;
        if (first)
            for (j = 0; j < n; j++) acc[j] = w * p[j];
        else
            for (j = 0; j < n; j++) acc[j] = __builtin_fmaf(w, p[j], acc[j]);
    }
#if HAVE_F16
    else {
        const f16_t *restrict p = (const f16_t *)x;
        if (first)
            for (j = 0; j < n; j++) acc[j] = w * (float)p[j];
        else
            for (j = 0; j < n; j++) acc[j] = __builtin_fmaf(w, (float)p[j], acc[j]);
    }
#endif
}

/* The same for four inputs of one dtype at once: the accumulator makes one trip through L1 instead of four.
 * Per element the order of operations is that of four single passes. */
#define FMA4_LOOP(load, start)                                                                      \
    for (j = 0; j < n; j++) {                                                                       \
        float a = start;                                                                            \
        a = __builtin_fmaf(w1, load(p1, j), a);                                                     \
        a = __builtin_fmaf(w2, load(p2, j), a);                                                     \
        acc[j] = __builtin_fmaf(w3, load(p3, j), a);                                                \
    }
#define FMA4(load)                                                                                  \
    if (first)                                                                                      \
        FMA4_LOOP(load, w0 * load(p0, j))                                                           \
    else                                                                                            \
        FMA4_LOOP(load, __builtin_fmaf(w0, load(p0, j), acc[j]))
#define LOAD_BF16(p, j) bf16_to_f32((p)[j])
#define LOAD_PLAIN(p, j) ((float)(p)[j])

MULTIVERSION
static void accumulate4(float *restrict acc, const void *const *x, int dtype, const float *w, size_t n, int first) {
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
    size_t j;
    if (dtype == BF16) {
        const uint16_t *restrict p0 = x[0], *restrict p1 = x[1], *restrict p2 = x[2], *restrict p3 = x[3];
        FMA4(LOAD_BF16)
    } else if (dtype == F32) {
        const float *restrict p0 = x[0], *restrict p1 = x[1], *restrict p2 = x[2], *restrict p3 = x[3];
        FMA4(LOAD_PLAIN)
    }
#if HAVE_F16
    else {
        const f16_t *restrict p0 = x[0], *restrict p1 = x[1], *restrict p2 = x[2], *restrict p3 = x[3];
        FMA4(LOAD_PLAIN)
    }
#endif
}

/* Rewrite the NaNs of a stored fp32 or fp16 block as the canonical quiet NaN (0x7fc00000, 0x7e00), as the Triton
 * kernel and the torch path write them: a NaN's payload after fma or a conversion differs between CPU and GPU.
 * Only blocks that hold a non-finite value come here, so the store loops stay as they were. */
static void canonical_nans(void *out, int dtype, const float *restrict acc, size_t n) {
    size_t j;
    for (j = 0; j < n; j++) {
        if ((f32_bits(acc[j]) & 0x7fffffffu) <= 0x7f800000u) continue;
        if (dtype == F32) {
            uint32_t nan = 0x7fc00000u;
            memcpy((uint32_t *)out + j, &nan, sizeof nan);
        } else {
            uint16_t nan = 0x7e00u;
            memcpy((uint16_t *)out + j, &nan, sizeof nan);
        }
    }
}

/* Store acc rounded to the output dtype; returns nonzero if any stored value is NaN or infinite. */
MULTIVERSION
static uint32_t store(void *out, int dtype, const float *restrict acc, size_t n) {
    uint32_t bad = 0;
    size_t j;
    if (dtype == BF16) {
        uint16_t *restrict o = (uint16_t *)out;
        for (j = 0; j < n; j++) {
            uint32_t u = f32_bits(acc[j]);
            uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
            uint16_t v = (uint16_t)(nan ? 0x7fc0u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            bad |= (v & 0x7f80u) == 0x7f80u;
            o[j] = v;
        }
    } else if (dtype == F32) {
        float *restrict o = (float *)out;
        for (j = 0; j < n; j++) {
            bad |= (f32_bits(acc[j]) & 0x7f800000u) == 0x7f800000u;
            o[j] = acc[j];
        }
    }
#if HAVE_F16
    else {
        f16_t *restrict o = (f16_t *)out;
        for (j = 0; j < n; j++) {
            f16_t v = (f16_t)acc[j];
            uint16_t bits;
            memcpy(&bits, &v, sizeof bits);
            bad |= (bits & 0x7c00u) == 0x7c00u;
            o[j] = v;
        }
    }
#endif
    if (bad && dtype != BF16) canonical_nans(out, dtype, acc, n);
    return bad;
}

static const size_t ITEMSIZE[] = {4, 2, 2};

static int weighted_average(void *out, int out_dtype, int n, void *const *xs, const int *dtypes,
                            const float *ws, size_t count) {
    float acc[BLOCK];
    uint32_t bad = 0;
    for (size_t start = 0; start < count; start += BLOCK) {
        size_t len = count - start < BLOCK ? count - start : BLOCK;
        for (int i = 0; i < n;) {
            int d = dtypes[i];
            if (i + 4 <= n && dtypes[i + 1] == d && dtypes[i + 2] == d && dtypes[i + 3] == d) {
                const void *group[4];
                for (int k = 0; k < 4; k++) group[k] = (const char *)xs[i + k] + start * ITEMSIZE[d];
                accumulate4(acc, group, d, ws + i, len, i == 0);
                i += 4;
            } else {
                accumulate(acc, (const char *)xs[i] + start * ITEMSIZE[d], d, ws[i], len, i == 0);
                i += 1;
            }
        }
        bad |= store((char *)out + start * ITEMSIZE[out_dtype], out_dtype, acc, len);
    }
    return !bad;
}

static int valid_dtype(long code) { return code == F32 || code == BF16 || (HAVE_F16 && code == F16); }

static PyObject *average(PyObject *self, PyObject *args) {
    unsigned long long out_address, count;
    int out_dtype;
    PyObject *inputs, *weights;
    if (!PyArg_ParseTuple(args, "KiOOK", &out_address, &out_dtype, &inputs, &weights, &count)) return NULL;
    if (!valid_dtype(out_dtype)) return PyErr_Format(PyExc_ValueError, "unsupported output dtype code %d", out_dtype);
    PyObject *xs_seq = PySequence_Fast(inputs, "inputs must be a sequence of (address, dtype code)");
    if (xs_seq == NULL) return NULL;
    PyObject *ws_seq = PySequence_Fast(weights, "weights must be a sequence of floats");
    if (ws_seq == NULL) {
        Py_DECREF(xs_seq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(xs_seq);
    void *xs[MAX_INPUTS];
    int dtypes[MAX_INPUTS];
    float ws[MAX_INPUTS];
    PyObject *result = NULL;
    if (n < 1 || n > MAX_INPUTS || PySequence_Fast_GET_SIZE(ws_seq) != n) {
        PyErr_Format(PyExc_ValueError, "expected 1 to %d inputs with one weight each", MAX_INPUTS);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long address;
        int code;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(xs_seq, i), "Ki", &address, &code)) goto done;
        if (!valid_dtype(code)) {
            PyErr_Format(PyExc_ValueError, "unsupported input dtype code %d", code);
            goto done;
        }
        xs[i] = (void *)(uintptr_t)address;
        dtypes[i] = code;
        ws[i] = (float)PyFloat_AsDouble(PySequence_Fast_GET_ITEM(ws_seq, i));
        if (PyErr_Occurred()) goto done;
    }
    int finite;
    Py_BEGIN_ALLOW_THREADS
    finite = weighted_average((void *)(uintptr_t)out_address, out_dtype, (int)n, xs, dtypes, ws, (size_t)count);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(finite);
done:
    Py_DECREF(xs_seq);
    Py_DECREF(ws_seq);
    return result;
}

static PyMethodDef methods[] = {
    {"average", average, METH_VARARGS,
     "average(out_address, out_dtype, inputs, weights, count) -> bool: the weighted average of `count` elements\n"
     "of each input (address, dtype code) into out, fp32 accumulation; True when every output is finite.\n"
     "Dtype codes: 0 float32, 1 bfloat16, 2 float16 (when HAS_FLOAT16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_average", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_average(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "HAS_FLOAT16", HAVE_F16) < 0 || PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
