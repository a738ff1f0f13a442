/* A C writer that opens a store, writes one step and holds it open until a line arrives on stdin:
   test_adversarial_stores.py checks that it and the Python writer take the same lock. */
#define QWEN3DBG_TAPS_IMPLEMENTATION
#include "qwen3dbg_taps.h"
int main(int argc, char **argv) {
    int64_t ids[1] = {5}, pos[1] = {0}, shape[3] = {1, 1, 2};
    float x[2] = {3, 3};
    q3t_store *s = q3t_open(argv[1], "c-writer", "float32", 1);
    (void)argc;
    if (q3t_error(s)[0]) { fprintf(stderr, "%s\n", q3t_error(s)); q3t_abandon(s); return 3; }
    if (q3t_begin_step(s, 0, 1, ids, pos) || q3t_write(s, "embed", Q3T_F32, 3, shape, x) || q3t_end_step(s)) return 1;
    puts("holding"); fflush(stdout);
    getchar();  /* hold the store open until told to close it */
    return q3t_close(s) ? 1 : 0;
}
