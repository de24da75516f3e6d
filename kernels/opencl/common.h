/* Shared definitions of the refslm OpenCL kernels.
 *
 * Every program is built with -DREAL=float or -DREAL=double (the compute dtype); float64 programs
 * also get -DREAL_IS_DOUBLE, and every program on a device with cl_khr_fp64 gets -DHAS_FP64 (sums
 * that the reference accumulates in float64 then use double: ACC). Indices into large arrays are long.
 */
#ifdef HAS_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#define ACC double
#else
#define ACC float
#endif
#ifdef REAL_IS_DOUBLE
#define REAL_MAX DBL_MAX
#else
#define REAL_MAX FLT_MAX
#endif

/* Weights stored as half (OpenCLBackend weight_storage="float16", build define W_HALF) are read with
 * vload_half, which is core OpenCL C (no cl_khr_fp16 needed), and computed in REAL. */
#ifdef W_HALF
#define WTYPE half
#define WLOAD(p, i) ((REAL)vload_half((i), (p)))
#else
#define WTYPE REAL
#define WLOAD(p, i) ((p)[i])
#endif

/* Activation kinds (host: refslm.ops.ACTIVATION_CODES). */
#define ACT_GELU_TANH 0
#define ACT_GELU_ERF 1
#define ACT_SILU 2

inline REAL sigmoid_stable(REAL x) {
    REAL e = exp(-fabs(x));
    return x >= (REAL)0 ? (REAL)1 / ((REAL)1 + e) : e / ((REAL)1 + e);
}

inline REAL activate(REAL x, int kind) {
    if (kind == ACT_GELU_TANH) {
        const REAL c = (REAL)0.7978845608028654;  /* sqrt(2 / pi) */
        return (REAL)0.5 * x * ((REAL)1 + tanh(c * (x + (REAL)0.044715 * x * x * x)));
    }
    if (kind == ACT_GELU_ERF) {
        return (REAL)0.5 * x * ((REAL)1 + erf(x * (REAL)0.7071067811865476));
    }
    return x * sigmoid_stable(x);
}

/* Tree reductions of one value per work-item over a power-of-two work-group (scratch: local, wg
 * items), returning the reduced value to every work-item: group_sum in REAL, group_sum_acc in ACC. */
#define DEFINE_GROUP_SUM(NAME, T)                                         \
    inline T NAME(T v, __local T *scratch) {                              \
        const int lid = get_local_id(0), wg = get_local_size(0);          \
        scratch[lid] = v;                                                 \
        barrier(CLK_LOCAL_MEM_FENCE);                                     \
        for (int s = wg / 2; s > 0; s >>= 1) {                            \
            if (lid < s) scratch[lid] += scratch[lid + s];                \
            barrier(CLK_LOCAL_MEM_FENCE);                                 \
        }                                                                 \
        T r = scratch[0];                                                 \
        barrier(CLK_LOCAL_MEM_FENCE);                                     \
        return r;                                                         \
    }
DEFINE_GROUP_SUM(group_sum, REAL)
DEFINE_GROUP_SUM(group_sum_acc, ACC)

inline REAL group_max(REAL v, __local REAL *scratch) {
    const int lid = get_local_id(0), wg = get_local_size(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = wg / 2; s > 0; s >>= 1) {
        if (lid < s) scratch[lid] = fmax(scratch[lid], scratch[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    REAL r = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return r;
}
