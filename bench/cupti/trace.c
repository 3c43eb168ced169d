// SPDX-License-Identifier: EUPL-1.2
//
// A CUDA injection library that records when every kernel, copy and memset of
// a process ran on the GPU, through NVIDIA's CUPTI activity API, for machines
// without Nsight Systems. The driver loads it into any CUDA program started
// with CUDA_INJECTION64_PATH=/path/to/libinfer_trace.so and calls
// InitializeInjection before the program's first CUDA call; the records go to
// the file named by INFER_TRACE_OUT as lines of
//
//     kind,start_ns,end_ns,graph_id,name
//
// (kind k = kernel, c = copy, s = memset; graph_id 0 for copies and memsets;
// the name last, as kernel names hold commas). `bench/cupti/steps.py` reads them. `bench/gpu.sh trace` builds it
// on the device, where CUPTI's headers come with NVIDIA's CUDA packages.
//
// KERNEL_RECORD names the newest CUpti_ActivityKernelN of the CUPTI that it is
// built against (the layout CUPTI writes); gpu.sh tries the versions from the
// newest down.

#include <cupti.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef KERNEL_RECORD
#define KERNEL_RECORD CUpti_ActivityKernel13
#endif

#define BUFFER_BYTES (16u << 20)

// The leading fields of CUPTI's copy and memset records, the same in every
// version of them (later versions only append fields).
typedef struct {
    CUpti_ActivityKind kind;
    uint8_t copy_kind, src_kind, dst_kind, flags;
    uint64_t bytes, start, end;
} CopyPrefix;

typedef struct {
    CUpti_ActivityKind kind;
    uint32_t value;
    uint64_t bytes, start, end;
} MemsetPrefix;

static FILE *out;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void report(const char *what, CUptiResult status) {
    const char *text = "?";
    cuptiGetResultString(status, &text);
    fprintf(stderr, "infer-trace: %s: %s\n", what, text);
}

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    // CUPTI asks for 8-byte alignment.
    *buffer = aligned_alloc(8, BUFFER_BYTES);
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream, uint8_t *buffer,
                                      size_t size, size_t valid) {
    (void)context;
    (void)stream;
    (void)size;
    CUpti_Activity *record = NULL;
    pthread_mutex_lock(&out_lock);
    while (out && cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        switch (record->kind) {
        case CUPTI_ACTIVITY_KIND_KERNEL:
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            const KERNEL_RECORD *k = (const KERNEL_RECORD *)record;
            fprintf(out, "k,%llu,%llu,%u,%s\n", (unsigned long long)k->start,
                    (unsigned long long)k->end, k->graphId, k->name ? k->name : "?");
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            const CopyPrefix *c = (const CopyPrefix *)record;
            fprintf(out, "c,%llu,%llu,0,copy kind %u bytes %llu\n", (unsigned long long)c->start,
                    (unsigned long long)c->end, (unsigned)c->copy_kind,
                    (unsigned long long)c->bytes);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            const MemsetPrefix *s = (const MemsetPrefix *)record;
            fprintf(out, "s,%llu,%llu,0,memset bytes %llu\n", (unsigned long long)s->start,
                    (unsigned long long)s->end, (unsigned long long)s->bytes);
            break;
        }
        default:
            break;
        }
    }
    pthread_mutex_unlock(&out_lock);
    size_t dropped = 0;
    if (cuptiActivityGetNumDroppedRecords(context, stream, &dropped) == CUPTI_SUCCESS && dropped)
        fprintf(stderr, "infer-trace: %zu records dropped\n", dropped);
    free(buffer);
}

static void finish(void) {
    cuptiActivityFlushAll(1);
    pthread_mutex_lock(&out_lock);
    if (out) {
        fclose(out);
        out = NULL;
    }
    pthread_mutex_unlock(&out_lock);
}

int InitializeInjection(void) {
    const char *path = getenv("INFER_TRACE_OUT");
    out = fopen(path ? path : "infer-trace.csv", "w");
    if (!out) {
        perror("infer-trace: INFER_TRACE_OUT");
        return 0;
    }
    CUptiResult status = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    if (status != CUPTI_SUCCESS) {
        report("cuptiActivityRegisterCallbacks", status);
        return 0;
    }
    const CUpti_ActivityKind kinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                                        CUPTI_ACTIVITY_KIND_MEMCPY, CUPTI_ACTIVITY_KIND_MEMSET};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        status = cuptiActivityEnable(kinds[i]);
        if (status != CUPTI_SUCCESS) report("cuptiActivityEnable", status);
    }
    atexit(finish);
    return 1;
}
