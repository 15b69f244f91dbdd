/*
 * Test of the C API, run under kolorun (ffi/tests/c_api.rs: -np 3, and under
 * valgrind with --quick). Calls every function on every dtype and op and
 * checks the results bitwise against references computed here, independently
 * of kolo; checks that invalid calls return the right status and message.
 * Then starts the engine with asynchronous named allreduces (submitted in a
 * different order on every rank, mixed with blocking calls), runs every
 * blocking collective again through the engine, and ends with mismatches
 * across ranks (which the engine reports on every rank, and survives).
 * Exit status 0 and "test_kolo: passed" on success.
 *
 *   test_kolo [--quick]        under kolorun
 *   test_kolo --sync-mismatch  under kolorun: a mismatch without the engine
 *                              (the communicator stays failed)
 *   test_kolo --init-error     alone, with KOLO_RANK=0 KOLO_SIZE=1 KOLO_TIMEOUT=bogus
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep */

#include "kolo.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int rank = -1, size = -1, failures = 0;

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        if (!(cond)) {                                                            \
            fprintf(stderr, "rank %d: %s:%d: check failed: %s: ", rank, __FILE__, \
                    __LINE__, #cond);                                             \
            fprintf(stderr, __VA_ARGS__);                                         \
            fputc('\n', stderr);                                                  \
            if (++failures > 20) exit(1);                                         \
        }                                                                         \
    } while (0)

#define OK(call)                                                                  \
    do {                                                                          \
        int rc_ = (call);                                                         \
        if (rc_ != KOLO_OK) {                                                     \
            fprintf(stderr, "rank %d: %s:%d: %s returned %d (%s): %s\n", rank,    \
                    __FILE__, __LINE__, #call, rc_, kolo_status_string(rc_),      \
                    kolo_last_error());                                           \
            exit(1);                                                              \
        }                                                                         \
    } while (0)

/* An invalid call: status `want`, and kolo_last_error() mentions `needle`. */
#define BAD(call, want, needle)                                                   \
    do {                                                                          \
        int rc_ = (call);                                                         \
        const char *e_ = kolo_last_error();                                       \
        CHECK(rc_ == (want), "%s returned %d, want %d (%s)", #call, rc_, (want),  \
              e_);                                                                \
        CHECK(strstr(e_, (needle)) != NULL, "%s: message %s lacks \"%s\"", #call, \
              e_, (needle));                                                      \
    } while (0)

/* ---- half and bfloat16, written here (round to nearest even) ---- */

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static uint16_t f32_to_f16(float f) {
    uint32_t x = f2u(f), sign = (x >> 16) & 0x8000, mant = x & 0x7fffff;
    int32_t e = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    if (e >= 31) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        uint32_t shift, h, rem, half;
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000;
        shift = (uint32_t)(14 - e);
        h = mant >> shift;
        rem = mant & ((1u << shift) - 1);
        half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    } else {
        uint32_t h = ((uint32_t)e << 10) | (mant >> 13), rem = mant & 0x1fff;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, mant = h & 0x3ff;
    if (e == 0) {
        float f = (float)mant * (1.0f / 16777216.0f); /* exact: mant * 2^-24 */
        return sign ? -f : f;
    }
    if (e == 31) return u2f(sign | 0x7f800000 | (mant << 13));
    return u2f(sign | ((e - 15 + 127) << 23) | (mant << 13));
}

static uint16_t f32_to_bf16(float f) {
    uint32_t x = f2u(f);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

static float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

/* ---- typed access to a buffer of any dtype ---- */

static const kolo_dtype DTYPES[] = {KOLO_UINT8,    KOLO_INT32,   KOLO_INT64,  KOLO_FLOAT16,
                                    KOLO_BFLOAT16, KOLO_FLOAT32, KOLO_FLOAT64};
static const char *DNAMES[] = {"?", "uint8", "int32", "int64", "float16", "bfloat16", "float32", "float64"};
static const kolo_op OPS[] = {KOLO_SUM, KOLO_PROD, KOLO_MIN, KOLO_MAX, KOLO_AVG};
static const char *ONAMES[] = {"?", "sum", "prod", "min", "max", "avg"};

static size_t dsize(kolo_dtype d) {
    switch (d) {
    case KOLO_UINT8: return 1;
    case KOLO_FLOAT16: case KOLO_BFLOAT16: return 2;
    case KOLO_INT32: case KOLO_FLOAT32: return 4;
    default: return 8;
    }
}
static int is_int(kolo_dtype d) { return d == KOLO_UINT8 || d == KOLO_INT32 || d == KOLO_INT64; }

/* Integers: stored from an int64 (truncated to the type). */
static void put_i(kolo_dtype d, void *b, size_t i, int64_t v) {
    switch (d) {
    case KOLO_UINT8: ((uint8_t *)b)[i] = (uint8_t)v; break;
    case KOLO_INT32: ((int32_t *)b)[i] = (int32_t)(uint32_t)(uint64_t)v; break;
    default: ((int64_t *)b)[i] = v; break;
    }
}
static int64_t get_i(kolo_dtype d, const void *b, size_t i) {
    switch (d) {
    case KOLO_UINT8: return ((const uint8_t *)b)[i];
    case KOLO_INT32: return ((const int32_t *)b)[i];
    default: return ((const int64_t *)b)[i];
    }
}
/* Floats: stored from a double, rounded to the type. */
static void put_f(kolo_dtype d, void *b, size_t i, double v) {
    switch (d) {
    case KOLO_FLOAT16: ((uint16_t *)b)[i] = f32_to_f16((float)v); break;
    case KOLO_BFLOAT16: ((uint16_t *)b)[i] = f32_to_bf16((float)v); break;
    case KOLO_FLOAT32: ((float *)b)[i] = (float)v; break;
    default: ((double *)b)[i] = v; break;
    }
}
static double get_f(kolo_dtype d, const void *b, size_t i) {
    switch (d) {
    case KOLO_FLOAT16: return f16_to_f32(((const uint16_t *)b)[i]);
    case KOLO_BFLOAT16: return bf16_to_f32(((const uint16_t *)b)[i]);
    case KOLO_FLOAT32: return ((const float *)b)[i];
    default: return ((const double *)b)[i];
    }
}

static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Input element `i` of rank `r` for (d, op), stored into b[j]. Integers use
 * their full range (sums and products wrap); floats are small integers whose
 * sums and products are exact in every float type at this size, so the result
 * is the same whatever order the ranks combine in. */
static void gen(kolo_dtype d, kolo_op op, int r, size_t i, uint64_t salt, void *b, size_t j) {
    uint64_t h = mix(((uint64_t)r << 40) ^ (i * 0x10001) ^ (salt << 20) ^ ((uint64_t)d << 8) ^ (uint64_t)op);
    if (is_int(d)) {
        put_i(d, b, j, (int64_t)h);
    } else if (op == KOLO_PROD) {
        static const double f[] = {-2, -1, 1, 2}; /* products are powers of two */
        put_f(d, b, j, f[h % 4]);
    } else {
        int64_t range = 120 / size; /* |sum| <= 120: exact even in bfloat16 */
        put_f(d, b, j, (double)((int64_t)(h % (uint64_t)(2 * range + 1)) - range));
    }
}

/* a (op) b in the arithmetic of d: integers wrap, floats are exact here. */
static void combine(kolo_dtype d, kolo_op op, void *acc, const void *inc, size_t i) {
    if (is_int(d)) {
        int64_t a = get_i(d, acc, i), b = get_i(d, inc, i), r;
        switch (op) {
        case KOLO_PROD: r = (int64_t)((uint64_t)a * (uint64_t)b); break;
        case KOLO_MIN: r = a < b ? a : b; break;
        case KOLO_MAX: r = a > b ? a : b; break;
        default: r = (int64_t)((uint64_t)a + (uint64_t)b); break;
        }
        put_i(d, acc, i, r);
    } else {
        double a = get_f(d, acc, i), b = get_f(d, inc, i), r;
        switch (op) {
        case KOLO_PROD: r = a * b; break;
        case KOLO_MIN: r = a < b ? a : b; break;
        case KOLO_MAX: r = a > b ? a : b; break;
        default: r = a + b; break;
        }
        put_f(d, acc, i, r);
    }
}

/* Finish an average: truncating division for integers; for float16/bfloat16
 * the quotient is computed in float and rounded once, as kolo documents. */
static void divide(kolo_dtype d, void *b, size_t i, int n) {
    if (is_int(d)) {
        if (d == KOLO_UINT8) put_i(d, b, i, (int64_t)((uint8_t)get_i(d, b, i) / n));
        else put_i(d, b, i, get_i(d, b, i) / n);
    } else if (d == KOLO_FLOAT64) {
        put_f(d, b, i, get_f(d, b, i) / n);
    } else {
        put_f(d, b, i, (double)((float)get_f(d, b, i) / (float)n));
    }
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { perror("malloc"); exit(1); }
    return p;
}

/* Bytes equal; on a difference, report the first element. */
static void expect_eq(const char *what, kolo_dtype d, kolo_op op, size_t count, const void *got,
                      const void *want) {
    size_t es = dsize(d), k;
    if (memcmp(got, want, count * es) == 0) return;
    for (k = 0; k < count; k++)
        if (memcmp((const char *)got + k * es, (const char *)want + k * es, es) != 0) break;
    if (is_int(d))
        CHECK(0, "%s %s %s count %zu: element %zu is %lld, want %lld", what, DNAMES[d], ONAMES[op],
              count, k, (long long)get_i(d, got, k), (long long)get_i(d, want, k));
    else
        CHECK(0, "%s %s %s count %zu: element %zu is %g, want %g", what, DNAMES[d], ONAMES[op],
              count, k, get_f(d, got, k), get_f(d, want, k));
}

/* Every rank holds the same bytes: gather them and compare with rank 0's. */
static void expect_same_on_all_ranks(kolo_comm *comm, const char *what, const void *buf, size_t bytes) {
    char *all = xmalloc(bytes * (size_t)size);
    int r;
    OK(kolo_allgather(comm, buf, all, bytes, KOLO_UINT8));
    for (r = 1; r < size; r++)
        CHECK(memcmp(all, all + (size_t)r * bytes, bytes) == 0, "%s: rank %d differs from rank 0", what, r);
    free(all);
}

/* ref[k] for k < count: the reduction over ranks of gen(.., r, k, salt). */
static void reference(kolo_dtype d, kolo_op op, size_t count, uint64_t salt, void *ref) {
    size_t es = dsize(d), k;
    char one[8], acc[8];
    int r;
    for (k = 0; k < count; k++) {
        gen(d, op, 0, k, salt, acc, 0);
        for (r = 1; r < size; r++) {
            gen(d, op, r, k, salt, one, 0);
            combine(d, op, acc, one, 0);
        }
        if (op == KOLO_AVG) divide(d, acc, 0, size);
        memcpy((char *)ref + k * es, acc, es);
    }
}

static void test_allreduce(kolo_comm *comm, kolo_dtype d, kolo_op op, size_t count) {
    size_t es = dsize(d), k;
    char *send = xmalloc(count * es), *recv = xmalloc(count * es), *ref = xmalloc(count * es);
    char *orig = xmalloc(count * es);
    uint64_t salt = 1;
    for (k = 0; k < count; k++) gen(d, op, rank, k, salt, send, k);
    memcpy(orig, send, count * es);
    reference(d, op, count, salt, ref);
    memset(recv, 0xab, count * es);
    OK(kolo_allreduce(comm, send, recv, count, d, op)); /* out of place */
    expect_eq("allreduce", d, op, count, recv, ref);
    CHECK(memcmp(send, orig, count * es) == 0, "allreduce changed sendbuf");
    OK(kolo_allreduce(comm, send, send, count, d, op)); /* in place */
    expect_eq("allreduce in place", d, op, count, send, ref);
    free(send); free(recv); free(ref); free(orig);
}

static void test_reduce_scatter(kolo_comm *comm, kolo_dtype d, kolo_op op, size_t count) {
    size_t es = dsize(d), total = count * (size_t)size, k;
    char *send = xmalloc(total * es), *recv = xmalloc(count * es), *ref = xmalloc(total * es);
    uint64_t salt = 2;
    for (k = 0; k < total; k++) gen(d, op, rank, k, salt, send, k);
    reference(d, op, total, salt, ref);
    memset(recv, 0xab, count * es);
    OK(kolo_reduce_scatter(comm, send, recv, count, d, op));
    expect_eq("reduce_scatter", d, op, count, recv, ref + (size_t)rank * count * es);
    /* NCCL-style in place: recvbuf is this rank's block of sendbuf. */
    OK(kolo_reduce_scatter(comm, send, send + (size_t)rank * count * es, count, d, op));
    expect_eq("reduce_scatter in place", d, op, count, send + (size_t)rank * count * es,
              ref + (size_t)rank * count * es);
    free(send); free(recv); free(ref);
}

static void test_moves(kolo_comm *comm, kolo_dtype d, size_t count) {
    size_t es = dsize(d), total = count * (size_t)size, k;
    char *a = xmalloc(total * es), *b = xmalloc(total * es), *want = xmalloc(total * es);
    int r, root;
    /* broadcast from every root */
    for (root = 0; root < size; root++) {
        for (k = 0; k < count; k++) {
            gen(d, KOLO_SUM, root, k, 3 + (uint64_t)root, want, k);
            if (rank == root) gen(d, KOLO_SUM, root, k, 3 + (uint64_t)root, a, k);
        }
        if (rank != root) memset(a, 0xcd, count * es);
        OK(kolo_broadcast(comm, a, count, d, root));
        expect_eq("broadcast", d, KOLO_SUM, count, a, want);
    }
    /* allgather: block r of recv is rank r's send */
    for (r = 0; r < size; r++)
        for (k = 0; k < count; k++) gen(d, KOLO_SUM, r, k, 40, want, (size_t)r * count + k);
    for (k = 0; k < count; k++) gen(d, KOLO_SUM, rank, k, 40, a, k);
    memset(b, 0xcd, total * es);
    OK(kolo_allgather(comm, a, b, count, d));
    expect_eq("allgather", d, KOLO_SUM, total, b, want);
    memset(b, 0xcd, total * es);
    memcpy(b + (size_t)rank * count * es, a, count * es);
    OK(kolo_allgather(comm, b + (size_t)rank * count * es, b, count, d)); /* in place */
    expect_eq("allgather in place", d, KOLO_SUM, total, b, want);
    /* alltoall: block j of rank r's send is gen(r, j * count + k); rank r
     * receives block r of every rank j at block j */
    for (r = 0; r < size; r++)
        for (k = 0; k < count; k++)
            gen(d, KOLO_SUM, r, (size_t)rank * count + k, 50, want, (size_t)r * count + k);
    for (k = 0; k < total; k++) gen(d, KOLO_SUM, rank, k, 50, a, k);
    memset(b, 0xcd, total * es);
    OK(kolo_alltoall(comm, a, b, count, d));
    expect_eq("alltoall", d, KOLO_SUM, total, b, want);
    free(a); free(b); free(want);
}

/* Non-integer floats: every rank gets the same bits, close to the exact sum. */
static void test_rounding(kolo_comm *comm, kolo_dtype d, size_t count) {
    size_t es = dsize(d), k;
    char *buf = xmalloc(count * es);
    double tol = d == KOLO_FLOAT64 ? 1e-12 : d == KOLO_FLOAT32 ? 1e-5 : d == KOLO_FLOAT16 ? 4e-3 : 3e-2;
    int r;
    for (k = 0; k < count; k++)
        put_f(d, buf, k, (double)(mix((uint64_t)rank * 1000003u + k) % 2000001) / 1e6 - 1.0);
    OK(kolo_allreduce(comm, buf, buf, count, d, KOLO_SUM));
    expect_same_on_all_ranks(comm, "allreduce of non-integer floats", buf, count * es);
    for (k = 0; k < count; k++) {
        double exact = 0, mag = 0, got = get_f(d, buf, k), diff;
        char one[8];
        for (r = 0; r < size; r++) {
            put_f(d, one, 0, (double)(mix((uint64_t)r * 1000003u + k) % 2000001) / 1e6 - 1.0);
            exact += get_f(d, one, 0);
            mag += get_f(d, one, 0) > 0 ? get_f(d, one, 0) : -get_f(d, one, 0);
        }
        diff = got - exact;
        if (diff < 0) diff = -diff;
        if (!(diff <= tol * (mag + 1))) {
            CHECK(0, "%s sum element %zu: %g, exact %g", DNAMES[d], k, got, exact);
            break;
        }
    }
    free(buf);
}

static void test_errors(kolo_comm *comm) {
    float v[8] = {0};
    char raw[16] = {0};
    int x = 0;
    const int inv = KOLO_ERR_INVALID_ARGUMENT;
    BAD(kolo_init_from_env(NULL), inv, "comm is NULL");
    BAD(kolo_comm_destroy(NULL), inv, "kolo_comm_destroy: comm is NULL");
    BAD(kolo_comm_rank(NULL, &x), inv, "kolo_comm_rank: comm is NULL");
    BAD(kolo_comm_size(comm, NULL), inv, "kolo_comm_size: size is NULL");
    BAD(kolo_comm_local_rank(comm, NULL), inv, "local_rank is NULL");
    BAD(kolo_allreduce(NULL, v, v, 8, KOLO_FLOAT32, KOLO_SUM), inv, "kolo_allreduce: comm is NULL");
    BAD(kolo_allreduce(comm, v, v, 8, (kolo_dtype)0, KOLO_SUM), inv, "unknown kolo_dtype 0");
    BAD(kolo_allreduce(comm, v, v, 8, (kolo_dtype)8, KOLO_SUM), inv, "unknown kolo_dtype 8");
    BAD(kolo_allreduce(comm, v, v, 8, (kolo_dtype)-1, KOLO_SUM), inv, "unknown kolo_dtype -1");
    BAD(kolo_allreduce(comm, v, v, 8, KOLO_FLOAT32, (kolo_op)0), inv, "unknown kolo_op 0");
    BAD(kolo_allreduce(comm, v, v, 8, KOLO_FLOAT32, (kolo_op)6), inv, "unknown kolo_op 6");
    BAD(kolo_allreduce(comm, NULL, NULL, 8, KOLO_FLOAT32, KOLO_SUM), inv, "recvbuf is NULL but its count is 8");
    BAD(kolo_allreduce(comm, NULL, v, 8, KOLO_FLOAT32, KOLO_SUM), inv, "sendbuf is NULL");
    BAD(kolo_allreduce(comm, v, NULL, 8, KOLO_FLOAT32, KOLO_SUM), inv, "recvbuf is NULL");
    BAD(kolo_allreduce(comm, v, v, SIZE_MAX, KOLO_FLOAT32, KOLO_SUM), inv, "overflow");
    BAD(kolo_allreduce(comm, raw + 1, raw + 1, 2, KOLO_FLOAT32, KOLO_SUM), inv, "not aligned");
    BAD(kolo_broadcast(NULL, v, 8, KOLO_FLOAT32, 0), inv, "kolo_broadcast: comm is NULL");
    BAD(kolo_broadcast(comm, NULL, 8, KOLO_FLOAT32, 0), inv, "buf is NULL");
    BAD(kolo_broadcast(comm, v, 8, KOLO_FLOAT32, -1), inv, "root -1 is negative");
    BAD(kolo_broadcast(comm, v, 8, (kolo_dtype)42, 0), inv, "unknown kolo_dtype 42");
    BAD(kolo_allgather(NULL, v, v, 1, KOLO_FLOAT32), inv, "kolo_allgather: comm is NULL");
    BAD(kolo_allgather(comm, v, NULL, 1, KOLO_FLOAT32), inv, "recvbuf is NULL");
    BAD(kolo_allgather(comm, v, v, SIZE_MAX / 2, KOLO_FLOAT32), inv, "overflow");
    BAD(kolo_reduce_scatter(NULL, v, v, 1, KOLO_FLOAT32, KOLO_SUM), inv, "comm is NULL");
    BAD(kolo_reduce_scatter(comm, NULL, v, 1, KOLO_FLOAT32, KOLO_SUM), inv, "sendbuf is NULL");
    BAD(kolo_reduce_scatter(comm, v, v, 1, KOLO_FLOAT32, (kolo_op)99), inv, "unknown kolo_op 99");
    BAD(kolo_alltoall(NULL, v, v, 1, KOLO_FLOAT32), inv, "kolo_alltoall: comm is NULL");
    BAD(kolo_alltoall(comm, v, v, SIZE_MAX / 2, KOLO_INT64), inv, "overflow");
    BAD(kolo_alltoall(comm, v, v, 1, (kolo_dtype)0), inv, "unknown kolo_dtype");
    BAD(kolo_barrier(NULL), inv, "kolo_barrier: comm is NULL");
    BAD(kolo_version(NULL, &x, &x), inv, "major is NULL");
    BAD(kolo_version(&x, &x, NULL), inv, "patch is NULL");
    /* None of those reached the communicator: it still works. */
    v[0] = 1.0f;
    OK(kolo_allreduce(comm, v, v, 1, KOLO_FLOAT32, KOLO_SUM));
    CHECK(v[0] == (float)size, "allreduce after invalid calls: %g", v[0]);
    /* Empty buffers may be NULL. */
    OK(kolo_allreduce(comm, NULL, NULL, 0, KOLO_INT32, KOLO_MAX));
    OK(kolo_allgather(comm, NULL, NULL, 0, KOLO_INT32));
    OK(kolo_barrier(comm));
}

/* Ranks disagree on the count: every rank fails (the ranks that see it report
 * a mismatch, the others are told by an abort), and the communicator stays failed. */
static void test_mismatch(kolo_comm *comm) {
    float v[16] = {0};
    size_t count = rank == 1 ? 9 : 8;
    int rc = kolo_allreduce(comm, v, v, count, KOLO_FLOAT32, KOLO_SUM), rc2;
    const char *e = kolo_last_error();
    CHECK(rc == KOLO_ERR_MISMATCH || rc == KOLO_ERR_ABORTED, "mismatched allreduce returned %d: %s", rc, e);
    CHECK(strstr(e, "mismatch") != NULL, "message %s lacks \"mismatch\"", e);
    CHECK(strstr(e, "allreduce") != NULL, "message %s lacks \"allreduce\"", e);
    rc2 = kolo_barrier(comm);
    CHECK(rc2 == rc, "barrier after the failure returned %d, not %d", rc2, rc);
}

/* ---- asynchronous operations (the engine) ---- */

enum { NT = 10 };

/* Wait for h by polling kolo_test; then kolo_test still says done (it frees
 * nothing) and kolo_wait returns the status at once. */
static int poll_then_wait(kolo_handle *h) {
    struct timespec nap = {0, 100000};
    int done = -1, again = -1;
    for (;;) {
        OK(kolo_test(h, &done));
        CHECK(done == 0 || done == 1, "kolo_test set done to %d", done);
        if (done) break;
        nanosleep(&nap, NULL);
    }
    OK(kolo_test(h, &again));
    CHECK(again == 1, "kolo_test after done: %d", again);
    return kolo_wait(h);
}

/* NT named allreduces of dtype d, the ops cycling through every op, counts
 * from `count` up, each rank submitting them in its own order with blocking
 * calls in between (so every rank has different tensors in flight during
 * them), then waiting in yet another order, half of them by polling. The
 * names repeat on every call with the same count (the engine's cache). */
static void test_async(kolo_comm *comm, kolo_dtype d, size_t count, uint64_t salt) {
    size_t es = dsize(d), cnt[NT], k;
    char *buf[NT], *ref[NT], name[64];
    kolo_handle *h[NT];
    int i, j, order[NT];
    for (i = 0; i < NT; i++) {
        kolo_op op = OPS[i % 5];
        cnt[i] = count + (size_t)i * 3;
        buf[i] = xmalloc(cnt[i] * es);
        ref[i] = xmalloc(cnt[i] * es);
        for (k = 0; k < cnt[i]; k++) gen(d, op, rank, k, salt + (uint64_t)i, buf[i], k);
        reference(d, op, cnt[i], salt + (uint64_t)i, ref[i]);
        /* 3 is coprime with NT: a permutation, shifted by rank, reversed on odd ranks */
        order[rank % 2 ? NT - 1 - i : i] = (3 * i + 7 * rank) % NT;
    }
    for (j = 0; j < NT; j++) {
        int64_t x = rank + 1;
        i = order[j];
        snprintf(name, sizeof name, "t.%s.%zu.%d", DNAMES[d], count, i);
        h[i] = NULL;
        OK(kolo_allreduce_async(comm, name, buf[i], cnt[i], d, OPS[i % 5], &h[i]));
        CHECK(h[i] != NULL, "no handle for %s", name);
        if (j == 3) {
            OK(kolo_allreduce(comm, &x, &x, 1, KOLO_INT64, KOLO_SUM));
            CHECK(x == (int64_t)size * (size + 1) / 2, "blocking allreduce among async ones: %lld",
                  (long long)x);
        } else if (j == 6) {
            OK(kolo_barrier(comm));
        }
    }
    {
        int64_t x = rank == size - 1 ? 77 : -1;
        OK(kolo_broadcast(comm, &x, 1, KOLO_INT64, size - 1));
        CHECK(x == 77, "blocking broadcast among async ones: %lld", (long long)x);
    }
    for (j = NT - 1; j >= 0; j--) {
        i = order[(j * 7 + rank) % NT];
        if (i % 2) OK(poll_then_wait(h[i]));
        else OK(kolo_wait(h[i]));
        expect_eq("allreduce_async", d, OPS[i % 5], cnt[i], buf[i], ref[i]);
        free(buf[i]);
        free(ref[i]);
    }
}

static void test_async_errors(kolo_comm *comm) {
    float v[8] = {0}, w[4] = {0};
    char raw[16] = {0};
    kolo_handle *h = (kolo_handle *)&h, *h2;
    int done = 0;
    const int inv = KOLO_ERR_INVALID_ARGUMENT;
    BAD(kolo_allreduce_async(NULL, "x", v, 8, KOLO_FLOAT32, KOLO_SUM, &h), inv,
        "kolo_allreduce_async: comm is NULL");
    CHECK(h == NULL, "*handle not set to NULL on failure");
    BAD(kolo_allreduce_async(comm, "x", v, 8, KOLO_FLOAT32, KOLO_SUM, NULL), inv, "handle is NULL");
    BAD(kolo_allreduce_async(comm, NULL, v, 8, KOLO_FLOAT32, KOLO_SUM, &h), inv, "name is NULL");
    BAD(kolo_allreduce_async(comm, "x", NULL, 8, KOLO_FLOAT32, KOLO_SUM, &h), inv,
        "buf is NULL but its count is 8");
    BAD(kolo_allreduce_async(comm, "x", v, 8, (kolo_dtype)0, KOLO_SUM, &h), inv, "unknown kolo_dtype 0");
    BAD(kolo_allreduce_async(comm, "x", v, 8, KOLO_FLOAT32, (kolo_op)9, &h), inv, "unknown kolo_op 9");
    BAD(kolo_allreduce_async(comm, "x", v, SIZE_MAX, KOLO_FLOAT32, KOLO_SUM, &h), inv, "overflow");
    BAD(kolo_allreduce_async(comm, "x", raw + 1, 2, KOLO_FLOAT32, KOLO_SUM, &h), inv, "not aligned");
    BAD(kolo_allreduce_async(comm, "kolo.sync.0", v, 8, KOLO_FLOAT32, KOLO_SUM, &h), inv, "reserved");
    BAD(kolo_wait(NULL), inv, "kolo_wait: handle is NULL");
    BAD(kolo_test(NULL, &done), inv, "kolo_test: handle is NULL");
    /* The first asynchronous call starts the engine (all the above were
     * rejected before it): at the same point on every rank, like a blocking
     * call. Empty buffers may be NULL. */
    OK(kolo_allreduce_async(comm, "empty", NULL, 0, KOLO_BFLOAT16, KOLO_AVG, &h));
    OK(poll_then_wait(h));
    /* A name already in flight on this rank: rank 0 submits "dup" twice
     * before the others submit it at all (after the barrier). */
    if (rank == 0) {
        OK(kolo_allreduce_async(comm, "dup", v, 8, KOLO_FLOAT32, KOLO_SUM, &h));
        h2 = (kolo_handle *)&h2;
        BAD(kolo_allreduce_async(comm, "dup", w, 4, KOLO_FLOAT32, KOLO_SUM, &h2), inv,
            "already in flight");
        CHECK(h2 == NULL, "*handle not set to NULL on failure");
        BAD(kolo_test(h, NULL), inv, "kolo_test: done is NULL");
        OK(kolo_barrier(comm));
    } else {
        OK(kolo_barrier(comm));
        OK(kolo_allreduce_async(comm, "dup", v, 8, KOLO_FLOAT32, KOLO_SUM, &h));
    }
    OK(kolo_wait(h));
}

/* With the engine running, ranks that disagree fail that call only, all with
 * KOLO_ERR_MISMATCH, and the communicator keeps working. */
static void test_mismatch_engine(kolo_comm *comm) {
    float v[16] = {0};
    int32_t iv[8] = {0};
    kolo_handle *h;
    const char *e;
    int rc = kolo_allreduce(comm, v, v, rank == 1 ? 9 : 8, KOLO_FLOAT32, KOLO_SUM);
    e = kolo_last_error();
    CHECK(rc == KOLO_ERR_MISMATCH, "mismatched blocking allreduce returned %d: %s", rc, e);
    CHECK(strstr(e, "mismatch") != NULL && strstr(e, "shape") != NULL, "message: %s", e);
    OK(kolo_barrier(comm));
    if (rank == 0) OK(kolo_allreduce_async(comm, "mm", v, 8, KOLO_FLOAT32, KOLO_SUM, &h));
    else OK(kolo_allreduce_async(comm, "mm", iv, 8, KOLO_INT32, KOLO_SUM, &h));
    rc = kolo_wait(h);
    e = kolo_last_error();
    CHECK(rc == KOLO_ERR_MISMATCH, "mismatched async allreduce returned %d: %s", rc, e);
    CHECK(strstr(e, "\"mm\"") != NULL && strstr(e, "dtype") != NULL, "message: %s", e);
    /* Still usable, also the name. */
    v[0] = 1.0f;
    OK(kolo_allreduce_async(comm, "mm", v, 1, KOLO_FLOAT32, KOLO_SUM, &h));
    OK(kolo_wait(h));
    CHECK(v[0] == (float)size, "allreduce after the mismatch: %g", v[0]);
    OK(kolo_barrier(comm));
}

/* The asynchronous forms of the other collectives, all in flight at once and
 * submitted in a different order on every rank: an allgather whose counts
 * differ per rank, a broadcast from the last rank, a reduce-scatter and an
 * alltoall; plus a grouped allreduce of two dtypes and an fp16-compressed
 * allreduce of values exact in fp16. */
static void test_async_moves(kolo_comm *comm, kolo_dtype d, size_t count) {
    size_t es = dsize(d), total = count * (size_t)size, gtotal = 0, k, off = 0;
    size_t mine = count + (size_t)rank;
    char *ga = xmalloc((count + (size_t)size) * es), *gb, *gw, *bc = xmalloc(count * es);
    char *bw = xmalloc(count * es), *rs = xmalloc(total * es), *rr = xmalloc(count * es);
    char *rw = xmalloc(total * es), *aa = xmalloc(total * es), *ab = xmalloc(total * es);
    char *aw = xmalloc(total * es), name[4][64];
    kolo_handle *h[4];
    int r, j, i;
    for (r = 0; r < size; r++) gtotal += count + (size_t)r;
    gb = xmalloc(gtotal * es);
    gw = xmalloc(gtotal * es);
    for (r = 0; r < size; off += count + (size_t)r, r++)
        for (k = 0; k < count + (size_t)r; k++) gen(d, KOLO_SUM, r, k, 60, gw, off + k);
    for (k = 0; k < mine; k++) gen(d, KOLO_SUM, rank, k, 60, ga, k);
    for (k = 0; k < count; k++) {
        gen(d, KOLO_SUM, size - 1, k, 61, bw, k);
        if (rank == size - 1) gen(d, KOLO_SUM, rank, k, 61, bc, k);
    }
    if (rank != size - 1) memset(bc, 0xcd, count * es);
    for (k = 0; k < total; k++) gen(d, KOLO_SUM, rank, k, 62, rs, k);
    reference(d, KOLO_SUM, total, 62, rw);
    for (r = 0; r < size; r++)
        for (k = 0; k < count; k++)
            gen(d, KOLO_SUM, r, (size_t)rank * count + k, 63, aw, (size_t)r * count + k);
    for (k = 0; k < total; k++) gen(d, KOLO_SUM, rank, k, 63, aa, k);
    memset(gb, 0xcd, gtotal * es);
    memset(rr, 0xcd, count * es);
    memset(ab, 0xcd, total * es);
    for (j = 0; j < 4; j++) {
        i = (j + rank) % 4;
        snprintf(name[i], sizeof name[i], "m%d.%s.%zu", i, DNAMES[d], count);
        if (i == 0) OK(kolo_allgather_async(comm, name[i], ga, mine, gb, gtotal, d, &h[i]));
        if (i == 1) OK(kolo_broadcast_async(comm, name[i], bc, count, d, size - 1, &h[i]));
        if (i == 2) OK(kolo_reduce_scatter_async(comm, name[i], rs, rr, count, d, KOLO_SUM, &h[i]));
        if (i == 3) OK(kolo_alltoall_async(comm, name[i], aa, ab, count, d, &h[i]));
    }
    memset(ga, 0xee, mine * es); /* inputs are copied at the call */
    for (i = 3; i >= 0; i--) OK(i % 2 ? poll_then_wait(h[i]) : kolo_wait(h[i]));
    expect_eq("allgather_async (uneven)", d, KOLO_SUM, gtotal, gb, gw);
    expect_eq("broadcast_async", d, KOLO_SUM, count, bc, bw);
    expect_eq("reduce_scatter_async", d, KOLO_SUM, count, rr, rw + (size_t)rank * count * es);
    expect_eq("alltoall_async", d, KOLO_SUM, total, ab, aw);
    free(ga); free(gb); free(gw); free(bc); free(bw); free(rs); free(rr); free(rw);
    free(aa); free(ab); free(aw);
}

static void test_grouped_compressed_join(kolo_comm *comm) {
    float f[5], fw[5];
    int64_t x[3];
    const char *names[2] = {"grp.f", "grp.x"};
    void *bufs[2] = {f, x};
    size_t counts[2] = {5, 3}, k;
    kolo_dtype dts[2] = {KOLO_FLOAT32, KOLO_INT64};
    kolo_handle *hs[2] = {NULL, NULL}, *h = NULL;
    int i, last = -1, local_size = -1;
    OK(kolo_comm_local_size(comm, &local_size));
    CHECK(local_size == size, "local_size %d on one host of %d ranks", local_size, size);
    for (k = 0; k < 5; k++) f[k] = (float)(rank * 10 + (int)k);
    for (k = 0; k < 3; k++) x[k] = rank + 1;
    OK(kolo_grouped_allreduce_async(comm, "grp", 2, names, bufs, counts, dts, KOLO_SUM, hs));
    OK(kolo_wait(hs[1]));
    OK(kolo_wait(hs[0]));
    for (k = 0; k < 5; k++)
        CHECK(f[k] == (float)(10 * size * (size - 1) / 2 + size * (int)k), "grouped f[%zu] %g", k, f[k]);
    for (k = 0; k < 3; k++) CHECK(x[k] == size * (size + 1) / 2, "grouped x %lld", (long long)x[k]);
    /* fp16 on the wire (prescaled by 1/size): within fp16 rounding of the exact sum. */
    for (k = 0; k < 5; k++) f[k] = (float)(rank - (int)k), fw[k] = 0;
    for (i = 0; i < size; i++)
        for (k = 0; k < 5; k++) fw[k] += (float)(i - (int)k);
    OK(kolo_allreduce_async_compressed(comm, "cmp", f, 5, KOLO_FLOAT32, KOLO_SUM, "fp16", &h));
    OK(kolo_wait(h));
    for (k = 0; k < 5; k++) {
        float err = f[k] > fw[k] ? f[k] - fw[k] : fw[k] - f[k];
        CHECK(err <= 2e-3f * (float)(size * 5), "fp16 allreduce f[%zu] %g want %g", k, f[k], fw[k]);
    }
    BAD(kolo_allreduce_async_compressed(comm, "cmp", f, 5, KOLO_FLOAT32, KOLO_SUM, "gzip", &h),
        KOLO_ERR_INVALID_ARGUMENT, "unknown compression");
    /* Join with uneven work: rank r runs r + 1 allreduces; allreduce i sums
     * the ones of the size - i ranks that still have data. */
    for (i = 0; i <= rank; i++) {
        char name[32];
        double one = 1;
        snprintf(name, sizeof name, "join.%d", i);
        OK(kolo_allreduce_async(comm, name, &one, 1, KOLO_FLOAT64, KOLO_SUM, &h));
        OK(kolo_wait(h));
        CHECK(one == (double)(size - i), "join allreduce %d: %g, want %d", i, one, size - i);
    }
    OK(kolo_join(comm, &last));
    CHECK(last == size - 1, "last rank to join %d, want %d", last, size - 1);
}

/* kolo_wait_timeout: rank 0 submits at once and waits in short slices while
 * the last rank submits 300 ms late: rank 0 sees "still running" first, then
 * everyone gets the exact sum and the handle is freed exactly once. */
static void test_wait_timeout(kolo_comm *comm) {
    float v[16];
    int i, done = -1, empty = 0, st;
    kolo_handle *h = NULL;
    for (i = 0; i < 16; i++) v[i] = (float)(rank + 1);
    if (rank == size - 1 && size > 1) {
        struct timespec ts = {0, 300 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    OK(kolo_allreduce_async(comm, "late-peer", v, 16, KOLO_FLOAT32, KOLO_SUM, &h));
    while ((st = kolo_wait_timeout(h, 0.05, &done)) == KOLO_OK && !done) empty++;
    CHECK(st == KOLO_OK && done == 1, "kolo_wait_timeout: status %d done %d (%s)", st, done,
          kolo_last_error());
    if (rank == 0 && size > 1) CHECK(empty >= 2, "rank 0 never saw the operation still running");
    for (i = 0; i < 16; i++)
        CHECK(v[i] == (float)(size * (size + 1) / 2), "wait_timeout sum %g", v[i]);
    BAD(kolo_wait_timeout(NULL, 1.0, &done), KOLO_ERR_INVALID_ARGUMENT, "NULL");
}

/* Last, as it ends the communicator: rank 0 aborts while idle; its next
 * call fails with KOLO_ERR_ABORTED at once, and every other rank's next call
 * fails too (told by rank 0) instead of waiting for it. */
static void test_abort(kolo_comm *comm) {
    float v[4] = {1, 1, 1, 1};
    struct timespec a, b;
    int st;
    if (rank == 0) OK(kolo_comm_abort(comm));
    BAD(kolo_comm_abort(NULL), KOLO_ERR_INVALID_ARGUMENT, "NULL");
    clock_gettime(CLOCK_MONOTONIC, &a);
    st = kolo_allreduce(comm, v, v, 4, KOLO_FLOAT32, KOLO_SUM);
    clock_gettime(CLOCK_MONOTONIC, &b);
    CHECK(st == KOLO_ERR_ABORTED || (rank != 0 && st == KOLO_ERR_PEER_LOST),
          "after kolo_comm_abort: status %d (%s)", st, kolo_last_error());
    CHECK((double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec) < 5.0,
          "the call after the abort took too long");
}

static void test_static(void) {
    int ma = -1, mi = -1, pa = -1, codes[] = {KOLO_OK, KOLO_ERR_INVALID_ARGUMENT, KOLO_ERR_MISMATCH,
        KOLO_ERR_PEER_LOST, KOLO_ERR_TIMEOUT, KOLO_ERR_INTERNAL, KOLO_ERR_ABORTED, KOLO_ERR_PROTOCOL,
        KOLO_ERR_CONFIG, KOLO_ERR_RENDEZVOUS, KOLO_ERR_IO};
    size_t i, j, n = sizeof codes / sizeof codes[0];
    CHECK(strcmp(kolo_last_error(), "") == 0, "last error before any failure: %s", kolo_last_error());
    OK(kolo_version(&ma, &mi, &pa));
    CHECK(ma == KOLO_VERSION_MAJOR && mi == KOLO_VERSION_MINOR && pa == KOLO_VERSION_PATCH,
          "library %d.%d.%d, header %d.%d.%d", ma, mi, pa, KOLO_VERSION_MAJOR, KOLO_VERSION_MINOR,
          KOLO_VERSION_PATCH);
    for (i = 0; i < n; i++) {
        CHECK(codes[i] <= 0 && kolo_status_string(codes[i]) != NULL, "status %d", codes[i]);
        CHECK(strcmp(kolo_status_string(codes[i]), "unknown status") != 0, "status %d", codes[i]);
        for (j = 0; j < i; j++)
            CHECK(codes[i] != codes[j] && strcmp(kolo_status_string(codes[i]), kolo_status_string(codes[j])) != 0,
                  "statuses %d and %d", codes[i], codes[j]);
    }
    CHECK(strcmp(kolo_status_string(KOLO_OK), "success") == 0, "%s", kolo_status_string(KOLO_OK));
    CHECK(strcmp(kolo_status_string(1), "unknown status") == 0, "%s", kolo_status_string(1));
    CHECK(strcmp(kolo_status_string(-99), "unknown status") == 0, "%s", kolo_status_string(-99));
}

int main(int argc, char **argv) {
    kolo_comm *comm = NULL;
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0, local = -1, n2 = -1;
    size_t full_counts[] = {1, 7, 1000, 70001}, quick_counts[] = {1, 7, 300, 20000};
    size_t *counts = quick ? quick_counts : full_counts, nc = 4, di, oi, ci;

    if (argc > 1 && strcmp(argv[1], "--init-error") == 0) {
        comm = (kolo_comm *)&comm; /* must be overwritten with NULL */
        BAD(kolo_init_from_env(&comm), KOLO_ERR_CONFIG, "KOLO_TIMEOUT");
        CHECK(comm == NULL, "comm not set to NULL on failure");
        if (failures) return 1;
        printf("test_kolo: passed\n");
        return 0;
    }
    test_static();
    if (argc > 1 && strcmp(argv[1], "--sync-mismatch") == 0) {
        OK(kolo_init_from_env(&comm));
        OK(kolo_comm_rank(comm, &rank));
        OK(kolo_comm_size(comm, &size));
        test_mismatch(comm);
        OK(kolo_comm_destroy(comm));
        if (failures) return 1;
        printf("test_kolo: passed (rank %d of %d, sync-mismatch)\n", rank, size);
        return 0;
    }
    OK(kolo_init_from_env(&comm));
    OK(kolo_comm_rank(comm, &rank));
    OK(kolo_comm_size(comm, &size));
    OK(kolo_comm_local_rank(comm, &local));
    n2 = atoi(getenv("KOLO_SIZE") ? getenv("KOLO_SIZE") : "-1");
    CHECK(size == n2, "size %d, KOLO_SIZE %d", size, n2);
    CHECK(rank >= 0 && rank < size && local >= 0 && local < size, "rank %d local %d", rank, local);

    for (di = 0; di < sizeof DTYPES / sizeof DTYPES[0]; di++) {
        kolo_dtype d = DTYPES[di];
        for (ci = 0; ci < nc; ci++) {
            size_t count = counts[ci];
            /* Large counts for the float types only, in quick mode (valgrind). */
            if (quick && count > 1000 && d != KOLO_FLOAT32) continue;
            for (oi = 0; oi < sizeof OPS / sizeof OPS[0]; oi++) {
                test_allreduce(comm, d, OPS[oi], count);
                test_reduce_scatter(comm, d, OPS[oi], count);
            }
            test_moves(comm, d, count);
            if (!is_int(d)) test_rounding(comm, d, count);
        }
        OK(kolo_barrier(comm));
    }
    test_errors(comm);
    /* The engine: started by the first asynchronous call. */
    test_async_errors(comm);
    for (di = 0; di < sizeof DTYPES / sizeof DTYPES[0]; di++) {
        kolo_dtype d = DTYPES[di];
        for (ci = 0; ci < nc; ci++) {
            if (quick && counts[ci] > 1000 && d != KOLO_FLOAT32) continue;
            test_async(comm, d, counts[ci], 100);
            test_async(comm, d, counts[ci], 200); /* the same names again */
        }
        /* Every blocking collective again, now through the engine. */
        for (ci = 0; ci < 3; ci++) {
            if (counts[ci] > 1000) continue;
            for (oi = 0; oi < sizeof OPS / sizeof OPS[0]; oi++) {
                test_allreduce(comm, d, OPS[oi], counts[ci]);
                test_reduce_scatter(comm, d, OPS[oi], counts[ci]);
            }
            test_moves(comm, d, counts[ci]);
            if (!is_int(d)) test_rounding(comm, d, counts[ci]);
        }
    }
    for (di = 0; di < sizeof DTYPES / sizeof DTYPES[0]; di++)
        for (ci = 0; ci < 3; ci++) test_async_moves(comm, DTYPES[di], counts[ci]);
    test_grouped_compressed_join(comm);
    test_wait_timeout(comm);
    test_errors(comm);
    test_mismatch_engine(comm);
    test_abort(comm);
    {
        /* Frees the communicator either way; reports the abort it ended with. */
        int st = kolo_comm_destroy(comm);
        CHECK(st == KOLO_OK || st == KOLO_ERR_ABORTED || st == KOLO_ERR_PEER_LOST,
              "kolo_comm_destroy after the abort: %d (%s)", st, kolo_last_error());
    }
    if (failures) {
        fprintf(stderr, "rank %d: %d checks failed\n", rank, failures);
        return 1;
    }
    printf("test_kolo: passed (rank %d of %d, %s)\n", rank, size, quick ? "quick" : "full");
    return 0;
}
