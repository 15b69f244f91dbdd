/* Average a vector across ranks with kolo's C API.
 *
 *   cc -O2 -Iffi/include ffi/examples/allreduce.c -Ltarget/release -lkolo \
 *      -Wl,-rpath,$PWD/target/release -o allreduce
 *   target/release/kolorun -np 3 ./allreduce
 */
#include <kolo.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call) do { int rc_ = (call); if (rc_ != KOLO_OK) { \
    fprintf(stderr, "%s: %s\n", kolo_status_string(rc_), kolo_last_error()); exit(1); } } while (0)

int main(void) {
    kolo_comm *comm;
    int rank, size;
    CHECK(kolo_init_from_env(&comm)); /* rank, size and rendezvous from kolorun */
    CHECK(kolo_comm_rank(comm, &rank));
    CHECK(kolo_comm_size(comm, &size));
    float grad[4] = {rank, rank, 2 * rank, 3 * rank};
    CHECK(kolo_allreduce(comm, grad, grad, 4, KOLO_FLOAT32, KOLO_AVG)); /* in place */
    int *all = malloc(size * sizeof *all);
    CHECK(kolo_allgather(comm, &rank, all, 1, KOLO_INT32)); /* all[i] = i */
    printf("rank %d of %d: mean %g %g %g %g, last rank %d\n", rank, size, grad[0], grad[1],
           grad[2], grad[3], all[size - 1]);
    free(all);
    CHECK(kolo_comm_destroy(comm));
    return 0;
}
