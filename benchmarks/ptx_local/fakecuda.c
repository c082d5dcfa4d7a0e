/* gdn benchmarks/ptx_local: see setup.sh. */
/* A stand-in for libcuda.so.1 on a host without a GPU: enough of the driver API for Mosaic GPU's
   MosaicGpuCompile to reach PTX and ptxas for an sm_90 device (H200). Every call is logged. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef int CUresult; typedef int CUdevice; typedef void *CUcontext;
static void logc(const char *n) { if (getenv("FAKECUDA_LOG")) fprintf(stderr, "[fakecuda] %s\n", n); }
CUresult cuInit(unsigned f) { logc("cuInit"); return 0; }
CUresult cuDriverGetVersion(int *v) { logc("cuDriverGetVersion"); *v = 13000; return 0; }
CUresult cuDeviceGetCount(int *c) { logc("cuDeviceGetCount"); *c = 1; return 0; }
CUresult cuDeviceGet(CUdevice *d, int o) { logc("cuDeviceGet"); *d = 0; return 0; }
CUresult cuCtxGetDevice(CUdevice *d) { logc("cuCtxGetDevice"); *d = 0; return 0; }
static int ctx_dummy;
CUresult cuCtxGetCurrent(CUcontext *c) { logc("cuCtxGetCurrent"); *c = &ctx_dummy; return 0; }
CUresult cuCtxPushCurrent(CUcontext c) { logc("cuCtxPushCurrent"); return 0; }
CUresult cuCtxPopCurrent(CUcontext *c) { logc("cuCtxPopCurrent"); if (c) *c = &ctx_dummy; return 0; }
CUresult cuCtxSetCurrent(CUcontext c) { logc("cuCtxSetCurrent"); return 0; }
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { logc("cuDevicePrimaryCtxRetain"); *c = &ctx_dummy; return 0; }
CUresult cuDeviceGetName(char *n, int len, CUdevice d) { logc("cuDeviceGetName"); strncpy(n, "NVIDIA H200", len); return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
  char b[64]; snprintf(b, sizeof b, "cuDeviceGetAttribute %d", attr); logc(b);
  switch (attr) {
    case 75: *v = 9; break;            /* compute capability major */
    case 76: *v = 0; break;            /* minor */
    case 16: *v = 132; break;          /* multiprocessors */
    case 97: *v = 232448; break;       /* max shared memory per block (optin) */
    case 8: *v = 49152; break;         /* shared memory per block */
    case 1: *v = 1024; break;          /* max threads per block */
    default: *v = 1;
  }
  return 0;
}
static const char *msg = "fakecuda: no GPU here";
CUresult cuGetErrorString(CUresult e, const char **s) { *s = msg; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = "CUDA_ERROR_FAKE"; return 0; }
/* loading the compiled module is where a real GPU is needed: fail there, after the dumps */
CUresult cuModuleLoadData(void **m, const void *img) { logc("cuModuleLoadData"); return 999; }
CUresult cuModuleLoadDataEx(void **m, const void *img, unsigned n, void *o, void **ov) { logc("cuModuleLoadDataEx"); return 999; }
CUresult cuLibraryLoadData(void **l, const void *c, void *a, void *b, unsigned n, void *c2, void *d, unsigned m) { logc("cuLibraryLoadData"); return 999; }
CUresult cuGetProcAddress(const char *sym, void **pfn, int v, unsigned long long f, void *st) {
  char b[128]; snprintf(b, sizeof b, "cuGetProcAddress %s", sym); logc(b); *pfn = 0; return 500; }
