/*
 * kolo.h: C API of kolo, collective communication over TCP (libkolo.so / libkolo.a).
 *
 * Hand-written; tests fail when it and the library disagree: ffi/src/tests.rs
 * (prototypes derived from the Rust signatures, enum, status and version values)
 * and ffi/tests/c_api.rs (the symbols libkolo.so and libkolo.a export).
 *
 *     kolo_comm *comm;
 *     if (kolo_init_from_env(&comm) != KOLO_OK) {   // under kolorun, torchrun, mpirun, srun
 *         fprintf(stderr, "kolo: %s\n", kolo_last_error());
 *         return 1;
 *     }
 *     kolo_allreduce(comm, grad, grad, n, KOLO_FLOAT32, KOLO_AVG);   // in place
 *     kolo_comm_destroy(comm);
 *
 * Every function returns KOLO_OK (0) or a negative status; on failure
 * kolo_last_error() has the full message. Collectives are blocking (except
 * the kolo_*_async calls, below); every rank must call the same blocking
 * collectives in the same order with matching arguments
 * (a mismatch is reported on every rank, never a hang: a collective that moves
 * nothing for KOLO_TIMEOUT seconds fails). After a failure inside a collective
 * the communicator stays failed and every later call returns the same error.
 * Arguments rejected at this boundary (NULL pointers, unknown enums, counts
 * that overflow, buffers misaligned for their dtype) return
 * KOLO_ERR_INVALID_ARGUMENT before any communication and leave the
 * communicator usable. Calls on one communicator from several threads are
 * serialised.
 *
 * Link: cc prog.c $(pkg-config --cflags --libs kolo), or -Iffi/include
 * -Ltarget/release -lkolo (add -lpthread -ldl -lm -lrt -lutil -lgcc_s for the
 * static libkolo.a; pkg-config --static --libs kolo lists them).
 */
#ifndef KOLO_H
#define KOLO_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Version this header belongs to; kolo_version() returns the library's. */
#define KOLO_VERSION_MAJOR 0
#define KOLO_VERSION_MINOR 1
#define KOLO_VERSION_PATCH 0

/* Status codes. */
#define KOLO_OK 0                      /* success */
#define KOLO_ERR_INVALID_ARGUMENT (-1) /* NULL pointer, unknown enum, overflowing count, bad root, wrong sizes */
#define KOLO_ERR_MISMATCH (-2)         /* ranks called a collective with different arguments */
#define KOLO_ERR_PEER_LOST (-3)        /* a peer closed or reset its connection */
#define KOLO_ERR_TIMEOUT (-4)          /* nothing moved for KOLO_TIMEOUT seconds */
#define KOLO_ERR_INTERNAL (-5)         /* a bug in kolo (a panic caught at the boundary) */
#define KOLO_ERR_ABORTED (-6)          /* another rank failed this collective; the message says why */
#define KOLO_ERR_PROTOCOL (-7)         /* a peer sent bytes that are not a kolo frame for this job */
#define KOLO_ERR_CONFIG (-8)           /* environment or launcher settings missing or contradictory */
#define KOLO_ERR_RENDEZVOUS (-9)       /* rendezvous failed: store unreachable or ranks missing */
#define KOLO_ERR_IO (-10)              /* OS-level I/O error outside a collective (bind, connect) */

/* Element types. The values are kolo's wire codes; 0 is never valid. */
typedef enum kolo_dtype {
    KOLO_UINT8 = 1,
    KOLO_INT32 = 2,
    KOLO_INT64 = 3,
    KOLO_FLOAT16 = 4,  /* IEEE 754 binary16 */
    KOLO_BFLOAT16 = 5, /* bfloat16 (upper half of a float32) */
    KOLO_FLOAT32 = 6,
    KOLO_FLOAT64 = 7
} kolo_dtype;

/* Reduction operators. Integers wrap; float16/bfloat16 are computed in float32
 * and rounded once per step; AVG sums, then divides by the number of ranks
 * (truncating for integers). Every rank gets the same bits. */
typedef enum kolo_op {
    KOLO_SUM = 1,
    KOLO_PROD = 2,
    KOLO_MIN = 3,
    KOLO_MAX = 4,
    KOLO_AVG = 5
} kolo_op;

/* A communicator: a group of ranks connected in a full mesh. Opaque. */
typedef struct kolo_comm kolo_comm;

/* One asynchronous operation (a kolo_*_async call), until kolo_wait frees it. Opaque. */
typedef struct kolo_handle kolo_handle;

/* Join the job described by the environment (KOLO_RANK/KOLO_SIZE/... as set
 * by kolorun; also torchrun, mpirun and srun variables) and store the
 * communicator in *comm (NULL on failure). Every rank must call it. */
int kolo_init_from_env(kolo_comm **comm);

/* Stop the engine if it runs (operations still pending fail), close the
 * connections and free comm (NULL is an invalid argument). */
int kolo_comm_destroy(kolo_comm *comm);

/* Abort `comm` from any thread: a call blocked on it returns KOLO_ERR_ABORTED
 * at once, pending handles and later calls fail the same way, and the peers
 * are told. Destroy it afterwards with kolo_comm_destroy. */
int kolo_comm_abort(const kolo_comm *comm);

/* This rank (0..size-1), the number of ranks, and the rank on this host. */
int kolo_comm_rank(const kolo_comm *comm, int *rank);
int kolo_comm_size(const kolo_comm *comm, int *size);
int kolo_comm_local_rank(const kolo_comm *comm, int *local_rank);
/* The number of ranks on this rank's host. */
int kolo_comm_local_size(const kolo_comm *comm, int *local_size);

/* Reduce count elements across ranks into recvbuf on every rank.
 * sendbuf == recvbuf is in place; otherwise sendbuf is copied to recvbuf first. */
int kolo_allreduce(kolo_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
                   kolo_dtype dtype, kolo_op op);

/* Copy count elements of root's buf to buf on every rank. */
int kolo_broadcast(kolo_comm *comm, void *buf, size_t count, kolo_dtype dtype, int root);

/* recvbuf (size * sendcount elements) gets every rank's sendbuf in rank order.
 * The buffers may overlap (in place: sendbuf == recvbuf + rank * sendcount). */
int kolo_allgather(kolo_comm *comm, const void *sendbuf, void *recvbuf, size_t sendcount,
                   kolo_dtype dtype);

/* Reduce sendbuf (size * recvcount elements) across ranks; recvbuf gets block
 * `rank` of the result. The buffers may overlap. */
int kolo_reduce_scatter(kolo_comm *comm, const void *sendbuf, void *recvbuf, size_t recvcount,
                        kolo_dtype dtype, kolo_op op);

/* Both buffers hold size blocks of count_per_rank elements: block j of sendbuf
 * goes to rank j, block i of recvbuf comes from rank i. They may overlap. */
int kolo_alltoall(kolo_comm *comm, const void *sendbuf, void *recvbuf, size_t count_per_rank,
                  kolo_dtype dtype);

/* Return once every rank has entered the barrier. */
int kolo_barrier(kolo_comm *comm);

/* Asynchronous named allreduce, as in Horovod: start an in-place reduction of
 * count elements of buf under `name` and return at once with *handle set (NULL
 * on failure). Ranks may submit their named operations in any order; a
 * background engine agrees on what every rank has submitted, fuses small
 * tensors and runs them. A name must be unique among this rank's operations in
 * flight and the same on every rank for the same tensor; names starting with
 * "kolo." are reserved. buf must stay valid and must not be read or written
 * until kolo_wait returns.
 *
 *     kolo_handle *h;
 *     kolo_allreduce_async(comm, "layer1.grad", grad, n, KOLO_FLOAT32, KOLO_AVG, &h);
 *     ... other work ...
 *     kolo_wait(h);              // grad holds the average; h is freed
 *
 * The first call starts the engine, which then owns the communicator; like a
 * blocking collective, that first call must come at the same point among the
 * blocking calls on every rank. The blocking collectives above keep working
 * (still called in the same order on every rank) and run through the engine,
 * so they mix with operations in flight. In that mode ranks that disagree on a call's arguments get
 * KOLO_ERR_MISMATCH for that call only and the communicator stays usable;
 * failures inside a collective (peer lost, timeout) still fail every later call. */
int kolo_allreduce_async(kolo_comm *comm, const char *name, void *buf, size_t count,
                         kolo_dtype dtype, kolo_op op, kolo_handle **handle);

/* kolo_allreduce_async with compression on the wire: compression is NULL,
 * "none", "fp16", "bf16", "topk" or "topk:DENSITY" (0 < DENSITY <= 1; top-k
 * keeps its error feedback under the tensor's name across calls). Anything
 * but none needs KOLO_FLOAT32; ranks must agree. */
int kolo_allreduce_async_compressed(kolo_comm *comm, const char *name, void *buf, size_t count,
                                    kolo_dtype dtype, kolo_op op, const char *compression,
                                    kolo_handle **handle);

/* Asynchronous forms of the other collectives, named and run by the engine
 * like kolo_allreduce_async. Inputs are copied at the call (sendbuf may be
 * reused at once); the output buffer is written when kolo_wait returns and
 * must not be touched before. Allgather lets sendcount differ between ranks:
 * recvcount must be the sum over ranks, else kolo_wait fails on this rank. */
int kolo_allgather_async(kolo_comm *comm, const char *name, const void *sendbuf, size_t sendcount,
                         void *recvbuf, size_t recvcount, kolo_dtype dtype, kolo_handle **handle);
int kolo_broadcast_async(kolo_comm *comm, const char *name, void *buf, size_t count,
                         kolo_dtype dtype, int root, kolo_handle **handle);
int kolo_reduce_scatter_async(kolo_comm *comm, const char *name, const void *sendbuf,
                              void *recvbuf, size_t recvcount, kolo_dtype dtype, kolo_op op,
                              kolo_handle **handle);
int kolo_alltoall_async(kolo_comm *comm, const char *name, const void *sendbuf, void *recvbuf,
                        size_t count_per_rank, kolo_dtype dtype, kolo_handle **handle);

/* Submit n in-place allreduces as one group named `group` (unique among
 * groups in flight): they reach the engine together and run only when every
 * member is ready on every rank. Member i is counts[i] elements of dtypes[i]
 * at bufs[i], named names[i]; handles[i] gets its handle (all NULL on
 * failure, when nothing was submitted). Each buffer is untouched until its
 * kolo_wait returns. */
int kolo_grouped_allreduce_async(kolo_comm *comm, const char *group, size_t n,
                                 const char *const *names, void *const *bufs,
                                 const size_t *counts, const kolo_dtype *dtypes, kolo_op op,
                                 kolo_handle **handles);

/* This rank has no more data: it takes part in the other ranks' allreduces
 * with the identity (zeros to sums) until every rank has joined; averages
 * divide by the ranks that contributed. *last_rank gets the last rank to
 * join. Every rank calls it once it is done; submit nothing meanwhile. */
int kolo_join(kolo_comm *comm, int *last_rank);

/* Block until the operation has finished, return its status (setting
 * kolo_last_error on failure) and free the handle: it is invalid afterwards,
 * whatever the status. Call it exactly once per handle, also after kolo_test
 * reported done, and also after kolo_comm_destroy (which fails operations
 * still pending). */
int kolo_wait(kolo_handle *handle);

/* Wait at most `seconds` (0 to 604800) for the operation of `handle`. Finished:
 * *done = 1, the handle is freed and its status returned, as kolo_wait does.
 * Still running: *done = 0, KOLO_OK, and the handle stays valid. */
int kolo_wait_timeout(kolo_handle *handle, double seconds, int *done);

/* Without blocking, set *done to 1 if the operation has finished (successfully
 * or not) and to 0 otherwise. Frees nothing: a finished handle must still be
 * passed to kolo_wait, which then returns its status at once. */
int kolo_test(kolo_handle *handle, int *done);

/* The full message of the last failed kolo call on this thread ("" if none;
 * successful calls leave it alone). Valid until the next failing call on this
 * thread; never NULL. */
const char *kolo_last_error(void);

/* A static description of a status code ("unknown status" otherwise); never NULL. */
const char *kolo_status_string(int status);

/* The library's version (compare with KOLO_VERSION_* of the header). */
int kolo_version(int *major, int *minor, int *patch);

#ifdef __cplusplus
}
#endif

#endif /* KOLO_H */
