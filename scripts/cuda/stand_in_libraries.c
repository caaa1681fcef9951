// Stand-ins for the NVIDIA driver (libcuda.so.1), cuBLAS (libcublas.so.13, or .12 for a CUDA 12
// one), cuRAND (libcurand.so.10) and NCCL (libnccl.so.2) holding only the symbols the CUDA
// build's checks call before it opens a device (worker/src/cuda_driver.rs,
// worker/src/comm/nccl/), so that scripts/cuda/runs_without_gpu.sh runs those checks, through
// cudarc's loader and ours, on a machine without a GPU. Nothing here computes, and every other
// symbol is absent. One file, built per library:
//
//   cc -shared -fPIC -DSTAND_IN_DRIVER -o libcuda.so.1 stand_in_libraries.c
//   cc -shared -fPIC -DSTAND_IN_CUBLAS_MAJOR=13 -o libcublas.so.13 stand_in_libraries.c
//   cc -shared -fPIC -DSTAND_IN_CURAND -o libcurand.so.10 stand_in_libraries.c
//   cc -shared -fPIC -DSTAND_IN_NCCL -o libnccl.so.2 stand_in_libraries.c
//
// The driver reads STAND_IN_INIT_ERROR (cuInit's result, default 0; it must be a CUresult, e.g.
// 999 CUDA_ERROR_UNKNOWN), STAND_IN_CUDA_VERSION (cuDriverGetVersion's, default 13000) and
// STAND_IN_GPU_COUNT (cuDeviceGetCount's, default 0; it has no device to open) from the
// environment. NCCL reads STAND_IN_NCCL_VERSION (ncclGetVersion's, default
// 23000 for 2.30.0); its other functions exist only to be resolved, and fail if called.
#include <stdlib.h>

#ifdef STAND_IN_DRIVER
static int env_int(const char* name, int fallback) {
  const char* v = getenv(name);
  return v != NULL && *v != '\0' ? atoi(v) : fallback;
}
int cuInit(unsigned int flags) {
  (void)flags;
  return env_int("STAND_IN_INIT_ERROR", 0);
}
int cuDriverGetVersion(int* version) {
  *version = env_int("STAND_IN_CUDA_VERSION", 13000);
  return 0;
}
int cuDeviceGetCount(int* count) {
  *count = env_int("STAND_IN_GPU_COUNT", 0);
  return 0;
}
int cuGetErrorString(int error, const char** text) {
  (void)error;
  *text = "the stand-in driver's cuInit failed";
  return 0;
}
int cuGetErrorName(int error, const char** text) {
  (void)error;
  *text = "CUDA_ERROR_STAND_IN";
  return 0;
}
#endif

#ifdef STAND_IN_CUBLAS_MAJOR
// libraryPropertyType: 0 MAJOR_VERSION, 1 MINOR_VERSION, 2 PATCH_LEVEL.
int cublasGetProperty(int type, int* value) {
  *value = type == 0 ? STAND_IN_CUBLAS_MAJOR : 0;
  return 0;
}
#endif

#ifdef STAND_IN_CURAND
int curandGetVersion(int* version) {
  *version = 10000;
  return 0;
}
#endif

#ifdef STAND_IN_NCCL
int ncclGetVersion(int* version) {
  const char* v = getenv("STAND_IN_NCCL_VERSION");
  *version = v != NULL && *v != '\0' ? atoi(v) : 23000;
  return 0;
}
const char* ncclGetErrorString(int result) {
  (void)result;
  return "the stand-in NCCL computes nothing";
}
const char* ncclGetLastError(void* comm) {
  (void)comm;
  return "the stand-in NCCL computes nothing";
}
// ncclInternalError, whatever the arguments.
#define STAND_IN_FAILS(name) \
  int name(void) { return 3; }
STAND_IN_FAILS(ncclGetUniqueId)
STAND_IN_FAILS(ncclCommInitRankConfig)
STAND_IN_FAILS(ncclCommAbort)
STAND_IN_FAILS(ncclCommGetAsyncError)
STAND_IN_FAILS(ncclAllReduce)
STAND_IN_FAILS(ncclReduceScatter)
STAND_IN_FAILS(ncclAllGather)
STAND_IN_FAILS(ncclBroadcast)
#endif
