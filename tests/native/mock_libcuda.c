/*
 * A stand-in libcuda.so.1 for testing libngkernels on machines without a GPU (tests/native/test_mock_driver.py).
 * "Device pointers" are host pointers; memsets write host memory; cuLaunchKernelEx hands the launch to a
 * callback that runs the same Triton kernel in the interpreter. Module handles are the cubin pointers, so the
 * callback can tell which specialisation the library picked.
 */
#include <cuda.h>
#include <stdint.h>
#include <string.h>

typedef void (*mock_launch_fn)(const void *cubin, unsigned grid_x, unsigned grid_y,
                               unsigned grid_z, unsigned block_x, unsigned shared, void **params);

static mock_launch_fn g_launch;
static int g_cc = 90, g_sms = 132, g_module_loads;
static uintptr_t g_ctx = 0x1000;

void mock_configure(mock_launch_fn launch, int cc, int sms, uintptr_t ctx) {
    g_launch = launch, g_cc = cc, g_sms = sms, g_ctx = ctx;
}
int mock_module_loads(void) { return g_module_loads; }

CUresult cuInit(unsigned int flags) { return flags == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE; }
CUresult cuGetErrorName(CUresult error, const char **name) {
    *name = error == CUDA_ERROR_INVALID_IMAGE ? "CUDA_ERROR_INVALID_IMAGE" : "CUDA_ERROR_MOCK";
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext *ctx) {
    *ctx = (CUcontext)g_ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice *device) {
    *device = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int *value, CUdevice_attribute attribute, CUdevice device) {
    (void)device;
    switch (attribute) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = g_cc / 10; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = g_cc % 10; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = g_sms; break;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}
CUresult cuModuleLoadData(CUmodule *module, const void *image) {
    /* an ELF image, aligned for its 64-bit fields */
    if (memcmp(image, "\x7f" "ELF", 4) != 0 || (uintptr_t)image % 8) return CUDA_ERROR_INVALID_IMAGE;
    ++g_module_loads;
    *module = (CUmodule)image;
    return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction *fn, CUmodule module, const char *name) {
    (void)name;
    *fn = (CUfunction)module;
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction fn, CUfunction_attribute attribute, int value) {
    (void)fn, (void)attribute, (void)value;
    return CUDA_SUCCESS;
}
CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction fn, void **params, void **extra) {
    if (extra || config->numAttrs || config->blockDimY != 1 || config->blockDimZ != 1 || !g_launch)
        return CUDA_ERROR_INVALID_VALUE;
    g_launch((const void *)fn, config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX,
             config->sharedMemBytes, params);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int value, size_t n, CUstream stream) {
    (void)stream;
    uint32_t *p = (uint32_t *)(uintptr_t)dst;
    for (size_t i = 0; i < n; ++i) p[i] = value;
    return CUDA_SUCCESS;
}
