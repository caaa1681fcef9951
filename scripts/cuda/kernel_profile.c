// A GPU kernel timeline for any CUDA program, ours or PyTorch's, through CUPTI's activity API:
// loaded by the CUDA driver as an injection library, it writes every kernel, memcpy and memset
// the program runs (device timestamps, stream, name) to a TSV file, and the windows the program
// marks (the timed training steps, the embedding) around them. `kernel_profile_summary.py`
// turns that into time per kernel, per kind of kernel, and the GPU's idle share per window.
// There is no Nsight Systems on the GPU machines this project is lent (no network, no CUDA
// toolkit), but PyTorch's environment carries libcupti.so.13.
//
//   CUDA_INJECTION64_PATH=$PWD/libcoca_kernel_profile.so COCA_KERNEL_PROFILE=run.tsv program ...
//
// Windows: the program looks this library up (dlopen of $CUDA_INJECTION64_PATH with
// RTLD_NOLOAD) and calls coca_kernel_profile_window("label") after synchronising the device
// at the start of what it times, and coca_kernel_profile_window(NULL) after synchronising at
// its end. Without windows the summary covers the whole run.
//
// Built by scripts/cuda/build.sh against the CUPTI 13.0 headers of scripts/cuda/toolchain.sh.
//
// TSV lines: what \t start_ns \t end_ns \t stream \t name, where `what` is kernel, memcpy,
// memset, open (a window's start: name = its label), close, or dropped (records CUPTI lost:
// start = their count).
#include <cupti.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define BUFFER_BYTES (8u << 20)

static FILE *out;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void line(const char *what, uint64_t start, uint64_t end, uint32_t stream,
                 const char *name) {
  fprintf(out, "%s\t%llu\t%llu\t%u\t%s\n", what, (unsigned long long)start,
          (unsigned long long)end, stream, name ? name : "");
}

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *buffer = aligned_alloc(ACTIVITY_RECORD_ALIGNMENT, BUFFER_BYTES);
  *size = *buffer ? BUFFER_BYTES : 0;
  *max_records = 0;
}

static const char *copy_kind(uint8_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "DtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_PTOP: return "PtoP";
    default: return "other";
  }
}

static void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream_id, uint8_t *buffer,
                                      size_t size, size_t valid) {
  (void)size;
  CUpti_Activity *record = NULL;
  char name[64];
  pthread_mutex_lock(&out_lock);
  while (out && cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)record;
        line("kernel", k->start, k->end, k->streamId, k->name);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)record;
        snprintf(name, sizeof name, "memcpy %s %llu bytes", copy_kind(m->copyKind),
                 (unsigned long long)m->bytes);
        line("memcpy", m->start, m->end, m->streamId, name);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const CUpti_ActivityMemset4 *m = (const CUpti_ActivityMemset4 *)record;
        snprintf(name, sizeof name, "memset %llu bytes", (unsigned long long)m->bytes);
        line("memset", m->start, m->end, m->streamId, name);
        break;
      }
      default: break;
    }
  }
  size_t dropped = 0;
  if (out && cuptiActivityGetNumDroppedRecords(context, stream_id, &dropped) == CUPTI_SUCCESS &&
      dropped > 0) {
    line("dropped", dropped, 0, stream_id, "");
  }
  pthread_mutex_unlock(&out_lock);
  free(buffer);
}

static void flush_at_exit(void) {
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  pthread_mutex_lock(&out_lock);
  if (out) fflush(out);
  pthread_mutex_unlock(&out_lock);
}

// Opens (label) or closes (NULL) a window at the current CUPTI time; closing also hands the
// records so far to the file, so a program that dies later loses nothing it timed. Returns 0,
// or -1 when the profile could not start.
__attribute__((visibility("default"))) int coca_kernel_profile_window(const char *label) {
  if (!out) return -1;
  uint64_t now = 0;
  cuptiGetTimestamp(&now);
  pthread_mutex_lock(&out_lock);
  line(label ? "open" : "close", now, now, 0, label);
  pthread_mutex_unlock(&out_lock);
  if (!label) {
    cuptiActivityFlushAll(0);
    pthread_mutex_lock(&out_lock);
    fflush(out);
    pthread_mutex_unlock(&out_lock);
  }
  return 0;
}

static int fail(const char *what, CUptiResult r) {
  const char *text = "?";
  cuptiGetResultString(r, &text);
  fprintf(stderr, "coca kernel profile: %s failed: %s\n", what, text);
  return 0;
}

// The driver's entry point for CUDA_INJECTION64_PATH, called once at cuInit.
__attribute__((visibility("default"))) int InitializeInjection(void) {
  const char *path = getenv("COCA_KERNEL_PROFILE");
  if (!path || !*path) path = "coca-kernel-profile.tsv";
  FILE *f = fopen(path, "w");
  if (!f) {
    fprintf(stderr, "coca kernel profile: cannot write %s\n", path);
    return 0;
  }
  CUptiResult r = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
  if (r != CUPTI_SUCCESS) return fail("cuptiActivityRegisterCallbacks", r);
  const CUpti_ActivityKind kinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                                      CUPTI_ACTIVITY_KIND_MEMCPY, CUPTI_ACTIVITY_KIND_MEMSET};
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; ++i) {
    r = cuptiActivityEnable(kinds[i]);
    if (r != CUPTI_SUCCESS) return fail("cuptiActivityEnable", r);
  }
  pthread_mutex_lock(&out_lock);
  out = f;
  pthread_mutex_unlock(&out_lock);
  atexit(flush_at_exit);
  fprintf(stderr, "coca kernel profile: recording kernels to %s\n", path);
  return 1;
}
