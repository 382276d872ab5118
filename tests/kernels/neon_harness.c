/* Runs the AArch64 kernels of src/sparsemerge/kernels/cpu_neon.py on inputs from a file (under
 * qemu-aarch64 in tests/kernels/test_kernels_neon.py).
 *
 * usage: neon_harness IN OUT
 * IN (little-endian int64 words, then bytes):
 *   kind (0: gemv24_f32_neon, 1: gemv24_int8_neon, 2: gemv24_int4_neon)
 *   narrays (4 for f32: vals meta x out; 6 for int8/int4: stream wscale corr xu xs out)
 *   per array: nbytes, then nbytes bytes
 *   ncalls, nints (5 for f32, 6 for int8/int4), then ncalls * nints int64 arguments
 * OUT: the last array (out) after all calls.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void f32_fn(const void *, const void *, const void *, void *, int64_t, int64_t, int64_t, int64_t,
                    int64_t);
typedef void a8_fn(const void *, const void *, const void *, const void *, const void *, void *, int64_t,
                   int64_t, int64_t, int64_t, int64_t, int64_t);
extern f32_fn gemv24_f32_neon;
extern a8_fn gemv24_int8_neon, gemv24_int4_neon;

static int64_t word(FILE *f) {
    int64_t v;
    if (fread(&v, sizeof v, 1, f) != 1) {
        fprintf(stderr, "neon_harness: input file too short\n");
        exit(2);
    }
    return v;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
        return 2;
    }
    FILE *in = fopen(argv[1], "rb");
    if (!in) {
        perror(argv[1]);
        return 2;
    }
    int64_t kind = word(in), narr = word(in);
    if (kind < 0 || kind > 2 || narr != (kind == 0 ? 4 : 6)) {
        fprintf(stderr, "neon_harness: bad header (kind %lld, %lld arrays)\n", (long long)kind, (long long)narr);
        return 2;
    }
    void *arr[6];
    int64_t size[6];
    for (int i = 0; i < narr; i++) {
        size[i] = word(in);
        /* 64 bytes of slack filled with 0xff (NaN as float): a kernel that reads past its array
         * shows up as a wrong result, not a crash */
        if (posix_memalign(&arr[i], 64, (size_t)size[i] + 64)) return 3;
        memset(arr[i], 0xff, (size_t)size[i] + 64);
        if (fread(arr[i], 1, (size_t)size[i], in) != (size_t)size[i]) {
            fprintf(stderr, "neon_harness: array %d too short\n", i);
            return 2;
        }
    }
    int64_t ncalls = word(in), nints = word(in);
    if (nints != (kind == 0 ? 5 : 6)) {
        fprintf(stderr, "neon_harness: %lld integer arguments\n", (long long)nints);
        return 2;
    }
    for (int64_t c = 0; c < ncalls; c++) {
        int64_t a[6];
        for (int i = 0; i < nints; i++) a[i] = word(in);
        if (kind == 0)
            gemv24_f32_neon(arr[0], arr[1], arr[2], arr[3], a[0], a[1], a[2], a[3], a[4]);
        else
            (kind == 1 ? gemv24_int8_neon : gemv24_int4_neon)(arr[0], arr[1], arr[2], arr[3], arr[4], arr[5], a[0],
                                                               a[1], a[2], a[3], a[4], a[5]);
    }
    fclose(in);
    FILE *out = fopen(argv[2], "wb");
    if (!out || fwrite(arr[narr - 1], 1, (size_t)size[narr - 1], out) != (size_t)size[narr - 1]) {
        perror(argv[2]);
        return 2;
    }
    fclose(out);
    return 0;
}
