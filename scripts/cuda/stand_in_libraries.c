// Stand-ins for the NVIDIA driver (libcuda.so.1), cuBLAS (libcublas.so.13, or .12 for a CUDA 12
// one) and cuRAND (libcurand.so.10) holding only the symbols the CUDA build's checks call before
// it opens a device (worker/src/cuda_driver.rs), so that scripts/cuda/runs_without_gpu.sh runs
// those checks, through cudarc's own loader and its list of library names, on a machine without
// a GPU. Nothing here computes, and every other symbol is absent. One file, built per library:
//
//   cc -shared -fPIC -DSTAND_IN_DRIVER -o libcuda.so.1 stand_in_libraries.c
//   cc -shared -fPIC -DSTAND_IN_CUBLAS_MAJOR=13 -o libcublas.so.13 stand_in_libraries.c
//   cc -shared -fPIC -DSTAND_IN_CURAND -o libcurand.so.10 stand_in_libraries.c
//
// The driver reads STAND_IN_INIT_ERROR (cuInit's result, default 0; it must be a CUresult, e.g.
// 999 CUDA_ERROR_UNKNOWN) and STAND_IN_CUDA_VERSION (cuDriverGetVersion's, default 13000) from
// the environment, and sees no GPU.
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
  *count = 0;
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
