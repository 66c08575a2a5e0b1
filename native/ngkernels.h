/*
 * libngkernels: the fused flow-matching + NormGuard loss kernels of the ngkernels Python package, compiled
 * ahead of time (Triton -> cubin for sm_80 and sm_90) for C and C++ trainers.
 *
 * The math is the Python op's (ngkernels/reference.py); for sample i with n_i = ||v_i||, r_i = ||v_ref,i||:
 *   loss_i = w_i * mean_j (v_ij - target_ij)^2 + ng_lambda * p_i
 *   p_i    = h_i or h_i^2 (squared),  h_i = max(0, n_i - (1 + margin) r_i)
 *            (relative: h_i = max(0, n_i / r_i - (1 + margin)))
 * and the loss is reduced over the batch by mean, sum or not at all. Gradients flow to v only.
 *
 * Conventions
 *   - Every pointer is a device pointer in the current CUDA context of the calling thread; work is queued on
 *     `stream` (NULL: the legacy default stream) and nothing is synchronised.
 *   - Each input is B rows of N elements with unit column stride and a row stride in elements (>= 0;
 *     0 broadcasts one row, e.g. a shared v_ref). v, target and v_ref share one dtype.
 *   - Outputs, weights and grad_output are float32. The gradient is a contiguous [B, N] array of the inputs'
 *     dtype. The library never allocates device memory: the caller passes a workspace of at least
 *     ng_workspace_size() bytes (any alignment), which may be reused between calls on the same stream.
 *   - Devices: compute capability 8.x runs the sm_80 code, 9.0 the sm_90 code; others get
 *     NG_ERROR_UNSUPPORTED_DEVICE. The CUDA driver (libcuda.so.1) is loaded at the first call that needs it.
 *   - Fastest path: 16-byte aligned inputs and gradient, N and row strides multiples of 16 (the same
 *     specialisation the Triton JIT picks); anything else runs a generic variant.
 *   - Thread-safe. Modules are loaded lazily, once per (context, kernel). Limits: B <= NG_MAX_BATCH,
 *     N <= INT32_MAX.
 */
#ifndef NGKERNELS_H
#define NGKERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NG_API __attribute__((visibility("default")))
#define NG_MAX_BATCH 0x2aaaaaaaLL /* 3 * B must fit an int32 (the [3, B] stats are indexed in int32) */

/* Same type as CUstream and cudaStream_t. */
struct CUstream_st;
typedef struct CUstream_st *ng_stream;

typedef enum ng_status {
    NG_SUCCESS = 0,
    NG_ERROR_INVALID_ARGUMENT = 1,     /* null pointer, B or N <= 0, margin <= -1, bad dtype/reduction, ... */
    NG_ERROR_WORKSPACE_TOO_SMALL = 2,  /* workspace NULL or smaller than ng_workspace_size() */
    NG_ERROR_DRIVER_NOT_FOUND = 3,     /* libcuda.so.1 missing, too old (no cuLaunchKernelEx) or cuInit failed */
    NG_ERROR_NO_CONTEXT = 4,           /* no current CUDA context on this thread */
    NG_ERROR_UNSUPPORTED_DEVICE = 5,   /* compute capability other than 8.x or 9.0 */
    NG_ERROR_CUDA = 6                  /* a driver call failed: ng_last_error() names it and the CUresult */
} ng_status;

typedef enum ng_dtype { NG_FLOAT32 = 0, NG_BFLOAT16 = 1, NG_FLOAT16 = 2 } ng_dtype;

typedef enum ng_reduction { NG_REDUCTION_NONE = 0, NG_REDUCTION_MEAN = 1, NG_REDUCTION_SUM = 2 } ng_reduction;

/* The loss inputs. target == NULL drops the flow-matching term, v_ref == NULL the NormGuard term. */
typedef struct ng_inputs {
    int64_t batch;               /* B */
    int64_t numel;               /* N: elements per sample (all non-batch dims flattened) */
    ng_dtype dtype;
    const void *v;
    int64_t v_row_stride;
    const void *target;
    int64_t target_row_stride;
    const void *v_ref;
    int64_t v_ref_row_stride;
    const float *weight;         /* [B] per-sample weights of the flow-matching term, or NULL (all 1) */
} ng_inputs;

typedef struct ng_options {
    float ng_lambda;             /* weight of the NormGuard penalty (default 1) */
    float margin;                /* > -1 (default 0) */
    int relative;                /* hinge on ||v|| / ||v_ref|| (default 0) */
    int squared;                 /* squared hinge (default 0) */
    ng_reduction reduction;      /* default NG_REDUCTION_MEAN */
    int splits;                  /* programs per row; 0: automatic (or the NGKERNELS_SPLITS variable) */
} ng_options;

/* The Python defaults: ng_lambda 1, margin 0, not relative, not squared, mean, automatic splits. */
NG_API ng_options ng_default_options(void);

/* Workspace bytes for a [B, N] problem (any device, any call of this API). */
NG_API ng_status ng_workspace_size(int64_t batch, int64_t numel, size_t *bytes);

/*
 * Fused flow matching + NormGuard (target and v_ref required), forward and backward in one call:
 *   loss        [1] (mean, sum) or [B] (none)
 *   stats       [3, B] per-sample v_norm, ref_norm, mse; or NULL
 *   grad        [B, N] of the inputs' dtype: d(loss)/dv scaled by grad_output
 *   grad_output [1] (mean, sum) or [B] (none) float32 device values, or NULL for 1
 */
NG_API ng_status ng_fm_normguard(const ng_inputs *inputs, const ng_options *options, const float *grad_output,
                                 float *loss, float *stats, void *grad, void *workspace, size_t workspace_bytes,
                                 ng_stream stream);

/* NormGuard alone (v_ref required, target and weight NULL); stats rows: v_norm, ref_norm, (mse untouched). */
NG_API ng_status ng_normguard(const ng_inputs *inputs, const ng_options *options, const float *grad_output,
                              float *loss, float *stats, void *grad, void *workspace, size_t workspace_bytes,
                              ng_stream stream);

/*
 * The two halves, for autograd: the forward writes loss, stats (or NULL) and coef [2, B] float32, which the
 * backward reads with grad_output to write grad. Any inputs with target and/or v_ref set. Stats and coef rows
 * of an absent term are left untouched. The backward does not read v_ref (any non-NULL pointer marks the
 * NormGuard term) and needs the workspace only when grad_output is NULL.
 */
NG_API ng_status ng_loss_forward(const ng_inputs *inputs, const ng_options *options, float *loss, float *stats,
                                 float *coef, void *workspace, size_t workspace_bytes, ng_stream stream);
NG_API ng_status ng_loss_backward(const ng_inputs *inputs, const ng_options *options, const float *coef,
                                  const float *grad_output, void *grad, void *workspace, size_t workspace_bytes,
                                  ng_stream stream);

/* Compute capability (e.g. 90) and SM count of the current context's device; checks it is supported. */
NG_API ng_status ng_query_device(int *compute_capability, int *num_sms);

/* Launch geometry the library uses for [B, N] on a device with num_sms SMs (splits 0: automatic):
 * ngkernels' launch_config rule with BLOCK_N rounded up to a compiled tile. For tests and diagnostics. */
typedef struct ng_plan {
    int64_t rows, block_n, n_row_blocks, n_splits, chunk, num_warps, tile;
} ng_plan;
NG_API ng_status ng_launch_plan(int64_t batch, int64_t numel, int num_sms, int splits, ng_plan *plan);

NG_API const char *ng_status_string(ng_status status);
/* Details of the last failure on this thread ("" if none), e.g. "margin must be > -1, got -1". */
NG_API const char *ng_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* NGKERNELS_H */
