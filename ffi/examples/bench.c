/* Time a large allreduce through the C API, measured like kolo-bench: one
 * checked call, warmup calls, a barrier, then timed back-to-back calls; the
 * per-rank median and mean, each the maximum over ranks.
 *
 *   bench [BYTES=64M] [ITERS=20] [WARMUP=5]      (float32 sum)
 *   target/release/kolorun -np 2 ./bench 64M
 */
#define _POSIX_C_SOURCE 199309L
#include <kolo.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(call) do { int rc_ = (call); if (rc_ != KOLO_OK) { \
    fprintf(stderr, "%s: %s\n", kolo_status_string(rc_), kolo_last_error()); exit(1); } } while (0)

static size_t parse_bytes(const char *s) {
    char *end;
    size_t v = strtoull(s, &end, 10);
    if (*end == 'K') v <<= 10;
    else if (*end == 'M') v <<= 20;
    else if (*end == 'G') v <<= 30;
    return v;
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    size_t bytes = parse_bytes(argc > 1 ? argv[1] : "64M"), count = bytes / sizeof(float), i;
    int iters = argc > 2 ? atoi(argv[2]) : 20, warmup = argc > 3 ? atoi(argv[3]) : 5, rank, size, k;
    kolo_comm *comm;
    float *buf = malloc(count * sizeof(float));
    double *times = malloc(iters * sizeof(double)), stats[2] = {0, 0};
    if (!buf || !times || iters < 1) return 2;
    CHECK(kolo_init_from_env(&comm));
    CHECK(kolo_comm_rank(comm, &rank));
    CHECK(kolo_comm_size(comm, &size));
    for (i = 0; i < count; i++) buf[i] = (float)(rank + 1);
    CHECK(kolo_allreduce(comm, buf, buf, count, KOLO_FLOAT32, KOLO_SUM));
    for (i = 0; i < count; i++)
        if (buf[i] != (float)size * (size + 1) / 2) { fprintf(stderr, "wrong result at %zu\n", i); return 1; }
    for (k = 0; k < warmup; k++) CHECK(kolo_allreduce(comm, buf, buf, count, KOLO_FLOAT32, KOLO_SUM));
    CHECK(kolo_barrier(comm));
    for (k = 0; k < iters; k++) {
        double t = now_us();
        CHECK(kolo_allreduce(comm, buf, buf, count, KOLO_FLOAT32, KOLO_SUM));
        times[k] = now_us() - t;
        stats[0] += times[k] / iters;
    }
    qsort(times, iters, sizeof(double), cmp);
    stats[1] = iters % 2 ? times[iters / 2] : (times[iters / 2 - 1] + times[iters / 2]) / 2;
    CHECK(kolo_allreduce(comm, stats, stats, 2, KOLO_FLOAT64, KOLO_MAX));
    if (rank == 0)
        printf("c-bench allreduce float32 sum: %zu bytes, N=%d, %d iters: time %.1f us, p50 %.1f us, "
               "busbw %.3f GB/s (p50)\n", count * sizeof(float), size, iters, stats[0], stats[1],
               count * sizeof(float) / stats[1] / 1e3 * 2.0 * (size - 1) / size);
    CHECK(kolo_comm_destroy(comm));
    free(buf);
    free(times);
    return 0;
}
