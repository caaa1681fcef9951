// The kernel profiler (kernel_profile.c) run without a GPU, by scripts/cuda/build.sh: built
// with -DSTAND_IN_CUPTI this file is a libcupti.so.13 that hands the profiler made-up kernel,
// memcpy and memset records at each flush; built without it, a program that loads the profiler
// as the driver would (InitializeInjection), opens and closes a window around one flush of
// records, leaves one more for the flush at exit, and exits. The summary of what the profiler
// wrote must then show exactly those records (build.sh checks it).
#include <cupti.h>
#include <stdio.h>
#include <string.h>

#ifdef STAND_IN_CUPTI

static CUpti_BuffersCallbackRequestFunc requested;
static CUpti_BuffersCallbackCompleteFunc completed;
static uint64_t clock_ns = 1000;
static int flushes;

CUptiResult cuptiActivityRegisterCallbacks(CUpti_BuffersCallbackRequestFunc r,
                                           CUpti_BuffersCallbackCompleteFunc c) {
  requested = r;
  completed = c;
  return CUPTI_SUCCESS;
}
CUptiResult cuptiActivityEnable(CUpti_ActivityKind kind) {
  (void)kind;
  return CUPTI_SUCCESS;
}
CUptiResult cuptiGetTimestamp(uint64_t *t) {
  *t = clock_ns;
  clock_ns += 10;
  return CUPTI_SUCCESS;
}
CUptiResult cuptiGetResultString(CUptiResult r, const char **text) {
  (void)r;
  *text = "stand-in";
  return CUPTI_SUCCESS;
}
CUptiResult cuptiActivityGetNumDroppedRecords(CUcontext c, uint32_t s, size_t *dropped) {
  (void)c;
  (void)s;
  *dropped = 0;
  return CUPTI_SUCCESS;
}

static size_t record_size(const CUpti_Activity *r) {
  switch (r->kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: return sizeof(CUpti_ActivityKernel10);
    case CUPTI_ACTIVITY_KIND_MEMCPY: return sizeof(CUpti_ActivityMemcpy6);
    case CUPTI_ACTIVITY_KIND_MEMSET: return sizeof(CUpti_ActivityMemset4);
    default: return 0;
  }
}

CUptiResult cuptiActivityGetNextRecord(uint8_t *buffer, size_t valid, CUpti_Activity **record) {
  uint8_t *next = *record ? (uint8_t *)*record + record_size(*record) : buffer;
  if (next >= buffer + valid) return CUPTI_ERROR_MAX_LIMIT_REACHED;
  *record = (CUpti_Activity *)next;
  return CUPTI_SUCCESS;
}

// Each flush: the first hands over two kernels (one inside the other's span), a memcpy and a
// memset, all between the clock's last two readings; later ones one kernel after the clock.
CUptiResult cuptiActivityFlushAll(uint32_t flag) {
  (void)flag;
  uint8_t *buffer;
  size_t size, max_records, used = 0;
  requested(&buffer, &size, &max_records);
  static char names[2][32] = {"_Z10gemm_tilesv", "layer_norm_fwd_bf16"};
  CUpti_ActivityKernel10 k;
  for (int i = 0; i < (flushes == 0 ? 2 : 1); ++i) {
    memset(&k, 0, sizeof k);
    k.kind = CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
    k.start = flushes == 0 ? (uint64_t)(1002 + i) : clock_ns + 100;
    k.end = k.start + (i == 0 ? 4 : 1);
    k.streamId = 7;
    k.name = names[i];
    memcpy(buffer + used, &k, sizeof k);
    used += sizeof k;
  }
  if (flushes == 0) {
    CUpti_ActivityMemcpy6 c;
    memset(&c, 0, sizeof c);
    c.kind = CUPTI_ACTIVITY_KIND_MEMCPY;
    c.copyKind = CUPTI_ACTIVITY_MEMCPY_KIND_DTOH;
    c.bytes = 64;
    c.start = 1007;
    c.end = 1008;
    memcpy(buffer + used, &c, sizeof c);
    used += sizeof c;
    CUpti_ActivityMemset4 m;
    memset(&m, 0, sizeof m);
    m.kind = CUPTI_ACTIVITY_KIND_MEMSET;
    m.bytes = 4096;
    m.start = 1008;
    m.end = 1009;
    memcpy(buffer + used, &m, sizeof m);
    used += sizeof m;
  }
  ++flushes;
  completed(NULL, 7, buffer, size, used);
  return CUPTI_SUCCESS;
}

#else

#include <dlfcn.h>

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s libcoca_kernel_profile.so\n", argv[0]);
    return 2;
  }
  void *profiler = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!profiler) {
    fprintf(stderr, "%s\n", dlerror());
    return 1;
  }
  int (*initialize)(void) = (int (*)(void))dlsym(profiler, "InitializeInjection");
  int (*window)(const char *) = (int (*)(const char *))dlsym(profiler, "coca_kernel_profile_window");
  if (!initialize || !window || initialize() != 1) return 1;
  // The window opens at 1000 and closes at 1010 (the stand-in clock), flushing its records.
  if (window("step") != 0 || window(NULL) != 0) return 1;
  return 0; // the profiler's atexit flush hands over one more kernel, after the window
}

#endif
