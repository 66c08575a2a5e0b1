/*
 * Test of libngkernels, run by ctest:  test_ngkernels DATA_DIR
 *
 * 1. Everywhere: argument checks, error codes and strings, the workspace size and the launch plan.
 * 2. On a GPU of compute capability 8.x or 9.0: every case of DATA_DIR/cases.txt (written by
 *    native/make_test_data.py with the ngkernels Python op) through the C API; loss, per-sample stats and
 *    gradient must match the Python op's outputs within the dtype's tolerance.
 * Without a driver or GPU (or on another GPU, after checking the unsupported-device error) it prints why and
 * returns 77, which ctest reports as skipped.
 */
#define _GNU_SOURCE
#include <cuda.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ngkernels.h"

#define SKIP 77

static int g_failures;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            ++g_failures;                                                  \
            printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);         \
            printf(__VA_ARGS__);                                           \
            printf("\n");                                                  \
        }                                                                  \
    } while (0)

#define EXPECT_STATUS(call, want)                                                                         \
    do {                                                                                                  \
        ng_status got_ = (call);                                                                          \
        CHECK(got_ == (want), "%s gave %s (%s), expected %s", #call, ng_status_string(got_), ng_last_error(), \
              ng_status_string(want));                                                                    \
    } while (0)

/* ------------------------------------------------------------------------------------------------------------
 * Part 1: no GPU needed. Fake device pointers are fine: every check happens before the driver is touched. */

static void test_arguments(void) {
    static float dev[64] __attribute__((aligned(256))); /* stands in for device memory, never dereferenced */
    char ws[4096] __attribute__((aligned(256)));
    size_t bytes = 0;
    EXPECT_STATUS(ng_workspace_size(4, 1000, &bytes), NG_SUCCESS);
    CHECK(bytes > 0 && bytes <= sizeof ws, "workspace for [4, 1000]: %zu bytes", bytes);
    EXPECT_STATUS(ng_workspace_size(0, 1000, &bytes), NG_ERROR_INVALID_ARGUMENT);
    EXPECT_STATUS(ng_workspace_size(4, 0, &bytes), NG_ERROR_INVALID_ARGUMENT);

    ng_inputs in = {4, 1000, NG_FLOAT32, dev, 1000, dev, 1000, dev, 1000, NULL};
    ng_options o = ng_default_options();
    CHECK(o.ng_lambda == 1.0f && o.margin == 0.0f && o.reduction == NG_REDUCTION_MEAN && !o.relative && !o.squared,
          "defaults differ from the Python op's");
    float *loss = dev, *grad = dev;
#define FUSED(inputs, options, work, work_bytes) \
    ng_fm_normguard(inputs, options, NULL, loss, NULL, grad, work, work_bytes, NULL)
    ng_inputs bad = in;
    bad.v = NULL;
    EXPECT_STATUS(FUSED(&bad, &o, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    bad = in, bad.batch = 0;
    EXPECT_STATUS(FUSED(&bad, &o, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    bad = in, bad.numel = -3;
    EXPECT_STATUS(FUSED(&bad, &o, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    bad = in, bad.numel = (int64_t)1 << 32;
    EXPECT_STATUS(FUSED(&bad, &o, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    bad = in, bad.dtype = (ng_dtype)7;
    EXPECT_STATUS(FUSED(&bad, &o, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    bad = in, bad.v_row_stride = -1;
    EXPECT_STATUS(FUSED(&bad, &o, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    bad = in, bad.v = (const char *)dev + 2;  /* not aligned to float32 elements */
    EXPECT_STATUS(FUSED(&bad, &o, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    bad = in, bad.target = NULL;              /* the fused op needs both terms */
    EXPECT_STATUS(FUSED(&bad, &o, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    ng_options bo = o;
    bo.margin = -1.0f;
    EXPECT_STATUS(FUSED(&in, &bo, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(ng_last_error(), "margin") != NULL, "message names the margin: %s", ng_last_error());
    bo = o, bo.margin = NAN;
    EXPECT_STATUS(FUSED(&in, &bo, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    bo = o, bo.reduction = (ng_reduction)5;
    EXPECT_STATUS(FUSED(&in, &bo, ws, bytes), NG_ERROR_INVALID_ARGUMENT);
    EXPECT_STATUS(FUSED(&in, &o, NULL, 0), NG_ERROR_WORKSPACE_TOO_SMALL);
    EXPECT_STATUS(FUSED(&in, &o, ws, bytes - 1), NG_ERROR_WORKSPACE_TOO_SMALL);
    EXPECT_STATUS(ng_fm_normguard(&in, &o, NULL, NULL, NULL, grad, ws, bytes, NULL), NG_ERROR_INVALID_ARGUMENT);
    EXPECT_STATUS(ng_fm_normguard(&in, &o, NULL, loss, NULL, NULL, ws, bytes, NULL), NG_ERROR_INVALID_ARGUMENT);
    EXPECT_STATUS(ng_normguard(&in, &o, NULL, loss, NULL, grad, ws, bytes, NULL), NG_ERROR_INVALID_ARGUMENT);
    bad = in, bad.target = NULL, bad.weight = dev;  /* a weight without the flow-matching term */
    EXPECT_STATUS(ng_loss_forward(&bad, &o, loss, NULL, NULL, ws, bytes, NULL), NG_ERROR_INVALID_ARGUMENT);
    bad = in, bad.target = NULL, bad.v_ref = NULL;
    EXPECT_STATUS(ng_loss_forward(&bad, &o, loss, NULL, NULL, ws, bytes, NULL), NG_ERROR_INVALID_ARGUMENT);
    EXPECT_STATUS(ng_loss_backward(&in, &o, NULL, NULL, grad, ws, bytes, NULL), NG_ERROR_INVALID_ARGUMENT);
#undef FUSED

    for (int s = NG_SUCCESS; s <= NG_ERROR_CUDA; ++s)
        CHECK(ng_status_string((ng_status)s)[0] != '\0', "status %d has a string", s);

    ng_plan p;
    EXPECT_STATUS(ng_launch_plan(8, 262144, 132, 0, &p), NG_SUCCESS);
    CHECK(p.block_n >= 1024 && p.n_splits > 1 && p.chunk * p.n_splits >= 262144 && p.chunk % p.block_n == 0,
          "8 x 262144 on 132 SMs splits rows: block_n %lld, %lld splits of %lld", (long long)p.block_n,
          (long long)p.n_splits, (long long)p.chunk);
    EXPECT_STATUS(ng_launch_plan(0, 5, 132, 0, &p), NG_ERROR_INVALID_ARGUMENT);
}

/* ------------------------------------------------------------------------------------------------------------
 * Part 2: the driver for the test's own allocations and copies, opened like the library does */

#define NG_STR_(x) #x
#define NG_STR(x) NG_STR_(x)
#define TEST_DRIVER_FUNCTIONS(X)                                                                             \
    X(cuInit) X(cuGetErrorName) X(cuDeviceGetCount) X(cuDeviceGet) X(cuDevicePrimaryCtxRetain)              \
    X(cuCtxSetCurrent) X(cuCtxSynchronize) X(cuMemAlloc) X(cuMemFree) X(cuMemcpyHtoD) X(cuMemcpyDtoH)       \
    X(cuMemsetD8)

static struct {
#define FIELD(f) __typeof__(&f) f;
    TEST_DRIVER_FUNCTIONS(FIELD)
#undef FIELD
} cu;

static const char *open_driver(void) {
    static char why[256];
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(why, sizeof why, "no CUDA driver (%s)", dlerror());
        return why;
    }
#define LOAD(f)                                                              \
    if (!(*(void **)&cu.f = dlsym(lib, NG_STR(f)))) {                        \
        snprintf(why, sizeof why, "CUDA driver without %s", NG_STR(f));      \
        return why;                                                          \
    }
    TEST_DRIVER_FUNCTIONS(LOAD)
#undef LOAD
    int count = 0;
    CUresult r = cu.cuInit(0);
    if (r == CUDA_SUCCESS) r = cu.cuDeviceGetCount(&count);
    if (r != CUDA_SUCCESS || count == 0) {
        const char *name = "no device";
        if (r != CUDA_SUCCESS) cu.cuGetErrorName(r, &name);
        snprintf(why, sizeof why, "no CUDA device (%s)", name);
        return why;
    }
    return NULL;
}

#define CU_OK(call)                                                                 \
    do {                                                                            \
        CUresult r_ = (call);                                                       \
        if (r_ != CUDA_SUCCESS) {                                                   \
            const char *n_ = "?";                                                   \
            cu.cuGetErrorName(r_, &n_);                                             \
            printf("FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #call, n_);          \
            exit(1);                                                                \
        }                                                                           \
    } while (0)

/* ------------------------------------------------------------------------------------------------------------
 * Cases */

typedef struct test_case {
    char name[64], api[16], dtype[8];
    long long B, N;
    int has_target, has_ref, ref_broadcast, has_weight, relative, squared, reduction;
    float ng_lambda, margin;
    int v_pad, has_grad_output;
} test_case;

static void *read_file(const char *dir, const char *name, const char *array, size_t want) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.%s.bin", dir, name, array);
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("FAIL: cannot open %s\n", path);
        exit(1);
    }
    void *data = malloc(want ? want : 1);
    size_t got = fread(data, 1, want, f);
    fclose(f);
    if (got != want) {
        printf("FAIL: %s has %zu bytes, expected %zu\n", path, got, want);
        exit(1);
    }
    return data;
}

static float half_to_float(uint16_t h, int bf16) {
    if (bf16) {
        uint32_t bits = (uint32_t)h << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else { /* subnormal */
        int e = -1;
        do { ++e; man <<= 1; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Rows of `cols` elements copied to a device buffer with the given row stride (0: one shared row). */
static CUdeviceptr upload_rows(const void *host, long long rows, long long cols, long long stride, size_t es) {
    long long stored_rows = stride == 0 ? 1 : rows;
    size_t bytes = (size_t)((stored_rows - 1) * (stride ? stride : cols) + cols) * es;
    CUdeviceptr d;
    CU_OK(cu.cuMemAlloc(&d, bytes));
    CU_OK(cu.cuMemsetD8(d, 0x7f, bytes)); /* padding that would poison any result that read it */
    for (long long r = 0; r < stored_rows; ++r)
        CU_OK(cu.cuMemcpyHtoD(d + (size_t)(r * stride) * es, (const char *)host + (size_t)(r * cols) * es,
                              (size_t)cols * es));
    return d;
}

static CUdeviceptr upload(const void *host, size_t bytes) {
    CUdeviceptr d;
    CU_OK(cu.cuMemAlloc(&d, bytes));
    CU_OK(cu.cuMemcpyHtoD(d, host, bytes));
    return d;
}

static int compare(const char *what, const test_case *c, const float *got, const float *want, size_t n, double rtol,
                   double atol_rel) {
    double scale = 0;
    for (size_t i = 0; i < n; ++i)
        if (!isnan(want[i]) && fabs(want[i]) > scale) scale = fabs(want[i]);
    double atol = atol_rel * scale;
    size_t bad = 0, worst = 0;
    double worst_err = -1;
    for (size_t i = 0; i < n; ++i) {
        if (isnan(want[i])) continue; /* a term the case does not have */
        double err = fabs((double)got[i] - want[i]);
        if (!(err <= atol + rtol * fabs(want[i]))) {
            ++bad;
            if (!(err <= worst_err)) worst_err = err, worst = i;
        }
    }
    if (bad) {
        ++g_failures;
        printf("FAIL %s %s: %zu of %zu values differ; e.g. [%zu] got %.9g, Python op %.9g\n", c->name, what, bad, n,
               worst, got[worst], want[worst]);
    }
    return bad == 0;
}

static void run_case(const char *dir, const test_case *c, int cc) {
    const int half = strcmp(c->dtype, "fp32") != 0, bf16 = strcmp(c->dtype, "bf16") == 0;
    const size_t es = half ? 2 : 4;
    const long long B = c->B, N = c->N;
    const long long v_stride = N + c->v_pad, ref_rows = c->ref_broadcast ? 1 : B;
    const size_t nloss = c->reduction == NG_REDUCTION_NONE ? (size_t)B : 1;

    void *v = read_file(dir, c->name, "v", (size_t)(B * N) * es);
    CUdeviceptr d_v = upload_rows(v, B, N, v_stride, es), d_t = 0, d_r = 0, d_w = 0, d_go = 0;
    if (c->has_target) d_t = upload_rows(read_file(dir, c->name, "target", (size_t)(B * N) * es), B, N, N, es);
    if (c->has_ref)
        d_r = upload_rows(read_file(dir, c->name, "v_ref", (size_t)(ref_rows * N) * es), B, N,
                          c->ref_broadcast ? 0 : N, es);
    if (c->has_weight) d_w = upload(read_file(dir, c->name, "weight", (size_t)B * 4), (size_t)B * 4);
    if (c->has_grad_output) d_go = upload(read_file(dir, c->name, "grad_output", nloss * 4), nloss * 4);
    float *want_loss = read_file(dir, c->name, "loss", nloss * 4);
    float *want_stats = read_file(dir, c->name, "stats", (size_t)(3 * B) * 4);
    float *want_grad = read_file(dir, c->name, "grad", (size_t)(B * N) * 4);

    ng_inputs in = {B, N, !half ? NG_FLOAT32 : bf16 ? NG_BFLOAT16 : NG_FLOAT16,
                    (const void *)(uintptr_t)d_v, v_stride,
                    (const void *)(uintptr_t)d_t, N,
                    (const void *)(uintptr_t)d_r, c->ref_broadcast ? 0 : N,
                    (const float *)(uintptr_t)d_w};
    ng_options o = ng_default_options();
    o.ng_lambda = c->ng_lambda;
    o.margin = c->margin;
    o.relative = c->relative;
    o.squared = c->squared;
    o.reduction = (ng_reduction)c->reduction;
    size_t ws_bytes;
    EXPECT_STATUS(ng_workspace_size(B, N, &ws_bytes), NG_SUCCESS);
    CUdeviceptr d_ws, d_loss, d_stats, d_grad, d_coef;
    CU_OK(cu.cuMemAlloc(&d_ws, ws_bytes + 4));
    CU_OK(cu.cuMemAlloc(&d_loss, nloss * 4));
    CU_OK(cu.cuMemAlloc(&d_stats, (size_t)(3 * B) * 4));
    CU_OK(cu.cuMemAlloc(&d_coef, (size_t)(2 * B) * 4));
    CU_OK(cu.cuMemAlloc(&d_grad, (size_t)(B * N) * es));
    float *loss = (float *)(uintptr_t)d_loss, *stats = (float *)(uintptr_t)d_stats;
    float *coef = (float *)(uintptr_t)d_coef;
    const float *go = (const float *)(uintptr_t)d_go;
    void *grad = (void *)(uintptr_t)d_grad;
    void *ws = (void *)(uintptr_t)(d_ws + 4); /* a workspace that is not 256-byte aligned works too */

    if (!strcmp(c->api, "fused"))
        EXPECT_STATUS(ng_fm_normguard(&in, &o, go, loss, stats, grad, ws, ws_bytes, NULL), NG_SUCCESS);
    else if (!strcmp(c->api, "normguard"))
        EXPECT_STATUS(ng_normguard(&in, &o, go, loss, stats, grad, ws, ws_bytes, NULL), NG_SUCCESS);
    else {
        EXPECT_STATUS(ng_loss_forward(&in, &o, loss, stats, coef, ws, ws_bytes, NULL), NG_SUCCESS);
        EXPECT_STATUS(ng_loss_backward(&in, &o, coef, go, grad, ws, ws_bytes, NULL), NG_SUCCESS);
    }
    CU_OK(cu.cuCtxSynchronize());

    float *got_loss = malloc(nloss * 4), *got_stats = malloc((size_t)(3 * B) * 4);
    float *got_grad = malloc((size_t)(B * N) * 4);
    void *grad_raw = malloc((size_t)(B * N) * es);
    CU_OK(cu.cuMemcpyDtoH(got_loss, d_loss, nloss * 4));
    CU_OK(cu.cuMemcpyDtoH(got_stats, d_stats, (size_t)(3 * B) * 4));
    CU_OK(cu.cuMemcpyDtoH(grad_raw, d_grad, (size_t)(B * N) * es));
    for (long long i = 0; i < B * N; ++i)
        got_grad[i] = half ? half_to_float(((uint16_t *)grad_raw)[i], bf16) : ((float *)grad_raw)[i];

    /* fp32 accumulation in a different order than the CPU op; the gradient is rounded to the dtype */
    const double grad_rtol = !half ? 1e-4 : bf16 ? 1.6e-2 : 2e-3;
    int ok = compare("loss", c, got_loss, want_loss, nloss, 1e-4, 1e-6);
    ok &= compare("stats", c, got_stats, want_stats, (size_t)(3 * B), 1e-4, 1e-6);
    ok &= compare("grad", c, got_grad, want_grad, (size_t)(B * N), grad_rtol, grad_rtol * 1e-2);
    printf("%s %s (sm_%d, %s, B=%lld, N=%lld, api %s)\n", ok ? "ok  " : "FAIL", c->name, cc, c->dtype, B, N, c->api);

    CUdeviceptr all[] = {d_v, d_t, d_r, d_w, d_go, d_ws, d_loss, d_stats, d_coef, d_grad};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; ++i)
        if (all[i]) cu.cuMemFree(all[i]);
    free(v), free(want_loss), free(want_stats), free(want_grad);
    free(got_loss), free(got_stats), free(got_grad), free(grad_raw);
}

static int run_cases(const char *dir, int cc) {
    char path[1024], line[512];
    snprintf(path, sizeof path, "%s/cases.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) {
        printf("FAIL: cannot open %s (written by native/make_test_data.py)\n", path);
        return 0;
    }
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#') continue;
        test_case c;
        int got = sscanf(line, "%63s %15s %7s %lld %lld %d %d %d %d %d %d %d %f %f %d %d", c.name, c.api, c.dtype,
                         &c.B, &c.N, &c.has_target, &c.has_ref, &c.ref_broadcast, &c.has_weight, &c.relative,
                         &c.squared, &c.reduction, &c.ng_lambda, &c.margin, &c.v_pad, &c.has_grad_output);
        if (got != 16) {
            printf("FAIL: bad line in %s: %s", path, line);
            ++g_failures;
            continue;
        }
        run_case(dir, &c, cc);
        ++n;
    }
    fclose(f);
    return n;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DATA_DIR (from native/make_test_data.py)\n", argv[0]);
        return 2;
    }
    test_arguments();
    if (g_failures) {
        printf("%d argument check(s) failed\n", g_failures);
        return 1;
    }
    printf("argument checks, error codes and launch plan: ok\n");

    const char *why = open_driver();
    if (why) {
        /* the library must say the same */
        int cc = 0;
        EXPECT_STATUS(ng_query_device(&cc, NULL), NG_ERROR_DRIVER_NOT_FOUND);
        if (g_failures) return 1;
        printf("SKIP: %s: the GPU comparison with the Python op did not run\n", why);
        return SKIP;
    }
    CUdevice dev;
    CUcontext ctx;
    CU_OK(cu.cuDeviceGet(&dev, 0));
    CU_OK(cu.cuDevicePrimaryCtxRetain(&ctx, dev));
    CU_OK(cu.cuCtxSetCurrent(ctx));
    int cc = 0, sms = 0;
    ng_status st = ng_query_device(&cc, &sms);
    if (st == NG_ERROR_UNSUPPORTED_DEVICE) {
        static float dummy[1];
        ng_inputs in = {1, 16, NG_FLOAT32, dummy, 16, NULL, 0, dummy, 16, NULL};
        ng_options o = ng_default_options();
        char ws[8192];
        EXPECT_STATUS(ng_normguard(&in, &o, NULL, dummy, NULL, dummy, ws, sizeof ws, NULL),
                      NG_ERROR_UNSUPPORTED_DEVICE);
        if (g_failures) return 1;
        printf("SKIP: device of compute capability %d.%d is not supported (%s): no comparison ran\n", cc / 10,
               cc % 10, ng_last_error());
        return SKIP;
    }
    EXPECT_STATUS(st, NG_SUCCESS);
    if (g_failures) return 1;
    printf("device: compute capability %d.%d, %d SMs\n", cc / 10, cc % 10, sms);
    int n = run_cases(argv[1], cc >= 90 ? 90 : 80);
    if (n == 0) ++g_failures;
    printf("%d case(s), %d failure(s)\n", n, g_failures);
    return g_failures ? 1 : 0;
}
