/* The scan's per-tensor statistics kernel, built on first use by stats.py (which documents it). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#include "../util/widen.h"

#define CHUNK 65536 /* elements per partial: the 16-bit zero counters below hold CHUNK / LANES */
#define LANES 16    /* independent accumulators, so the loops vectorize without reassociating */

typedef struct {
    int64_t n_finite, n_nan, n_posinf, n_neginf, n_zero;
    double sum, sumsq;  /* of (x - shift) over finite x: the shift keeps mean/std from cancelling */
    double min, max;    /* over finite x; +inf / -inf while there is none */
} stats_t;

/* Integer keys that order like the floats (sign-magnitude to two's complement): exact min/max in
   the element's own width, the same transform maps a key back. */
#define KEY(K, U, BITS, ABS, u) ((K)((u) ^ (((U)((K)(u) >> ((BITS) - 1))) & (ABS))))
#define KMAX(K, U, BITS) ((K)(((U)1 << ((BITS) - 1)) - 1))
#define KMIN(K, U, BITS) ((K)((U)1 << ((BITS) - 1)))

/* For each element type: `masked_*` is the plain scalar spec, used for the rare chunk holding a NaN or
   an inf; `chunk_*` is the fast path: a double-sum pass (a non-finite element makes a sum non-finite,
   which sends the chunk to the spec), then an integer pass for min/max/zeros while the chunk is in cache. */
#define CHUNK_FNS(T, U, K, EXP, ABS, BITS, TO_DOUBLE)                                             \
static void masked_##T(const U* p, int64_t n, double shift, stats_t* s) {                        \
    K kmin = KMAX(K, U, BITS), kmax = KMIN(K, U, BITS);                                           \
    memset(s, 0, sizeof *s);                                                                      \
    for (int64_t i = 0; i < n; i++) {                                                             \
        U u = p[i];                                                                               \
        if ((u & EXP) == EXP) {                                                                   \
            if (u & (ABS & ~EXP)) s->n_nan++;                                                     \
            else if (u >> ((BITS) - 1)) s->n_neginf++;                                            \
            else s->n_posinf++;                                                                   \
            continue;                                                                             \
        }                                                                                         \
        double d = TO_DOUBLE(u) - shift;                                                          \
        K k = KEY(K, U, BITS, ABS, u);                                                            \
        s->sum += d; s->sumsq += d * d; s->n_finite++; s->n_zero += (u & ABS) == 0;               \
        if (k < kmin) kmin = k;                                                                   \
        if (k > kmax) kmax = k;                                                                   \
    }                                                                                             \
    s->min = s->n_finite ? TO_DOUBLE((U)KEY(K, U, BITS, ABS, (U)kmin)) : INFINITY;                \
    s->max = s->n_finite ? TO_DOUBLE((U)KEY(K, U, BITS, ABS, (U)kmax)) : -INFINITY;               \
}                                                                                                 \
static void chunk_##T(const U* p, int64_t n, double shift, stats_t* s) {                         \
    double sm[LANES] = {0}, sq[LANES] = {0};                                                      \
    int64_t i = 0, m = n - n % LANES;                                                             \
    for (i = 0; i < m; i += LANES)                                                                \
        for (int j = 0; j < LANES; j++) {                                                         \
            double d = TO_DOUBLE(p[i + j]) - shift;                                               \
            sm[j] += d; sq[j] += d * d;                                                           \
        }                                                                                         \
    for (; i < n; i++) { double d = TO_DOUBLE(p[i]) - shift; sm[0] += d; sq[0] += d * d; }        \
    double sum = 0, sumsq = 0;                                                                    \
    for (int j = 0; j < LANES; j++) { sum += sm[j]; sumsq += sq[j]; }                             \
    if (!isfinite(sum) || !isfinite(sumsq)) { masked_##T(p, n, shift, s); return; }               \
    K mn[LANES], mx[LANES]; U nz[LANES];                                                          \
    for (int j = 0; j < LANES; j++) { mn[j] = KMAX(K, U, BITS); mx[j] = KMIN(K, U, BITS); nz[j] = 0; } \
    for (i = 0; i < m; i += LANES)                                                                \
        for (int j = 0; j < LANES; j++) {                                                         \
            U u = p[i + j];                                                                       \
            K k = KEY(K, U, BITS, ABS, u);                                                        \
            mn[j] = k < mn[j] ? k : mn[j]; mx[j] = k > mx[j] ? k : mx[j];                         \
            nz[j] += (U)((u & ABS) == 0);                                                         \
        }                                                                                         \
    for (; i < n; i++) {                                                                          \
        K k = KEY(K, U, BITS, ABS, p[i]);                                                         \
        mn[0] = k < mn[0] ? k : mn[0]; mx[0] = k > mx[0] ? k : mx[0]; nz[0] += (U)((p[i] & ABS) == 0); \
    }                                                                                             \
    K kmin = mn[0], kmax = mx[0];                                                                 \
    int64_t zeros = 0;                                                                            \
    for (int j = 0; j < LANES; j++) {                                                             \
        kmin = mn[j] < kmin ? mn[j] : kmin; kmax = mx[j] > kmax ? mx[j] : kmax; zeros += nz[j];   \
    }                                                                                             \
    s->n_finite = n; s->n_nan = s->n_posinf = s->n_neginf = 0; s->n_zero = zeros;                 \
    s->sum = sum; s->sumsq = sumsq;                                                               \
    s->min = TO_DOUBLE((U)KEY(K, U, BITS, ABS, (U)kmin));                                         \
    s->max = TO_DOUBLE((U)KEY(K, U, BITS, ABS, (U)kmax));                                         \
}

CHUNK_FNS(f64, uint64_t, int64_t, 0x7ff0000000000000ULL, 0x7fffffffffffffffULL, 64, from_f64)
CHUNK_FNS(f32, uint32_t, int32_t, 0x7f800000u, 0x7fffffffu, 32, from_f32)
CHUNK_FNS(bf16, uint16_t, int16_t, 0x7f80u, 0x7fffu, 16, from_bf16)
CHUNK_FNS(f16, uint16_t, int16_t, 0x7c00u, 0x7fffu, 16, from_f16)

/* 16-bit types have only 65536 values: count each (a scatter increment, ~3x faster than the sweep
   above) and take every statistic from the counts, the moments in one exact-order pass over the bins.
   SUBS interleaved histograms per thread keep runs of equal values from serializing on one counter. */
#define HIST_MIN (1 << 20) /* below this, clearing and folding the histograms costs more than it saves */
#define PAR_MIN (1 << 23)  /* below this, waking a second thread (a time slice on a busy machine) costs more */
#define SUBS 4
static int hist_stats(const uint16_t* p, int64_t n, int is_bf16, double shift, stats_t* s) {
    int nt = n >= PAR_MIN ? omp_get_max_threads() : 1;
    uint32_t* h = calloc((size_t)nt * SUBS * 65536, sizeof(uint32_t)); /* n < 2^32 per call: no overflow */
    if (!h) return 1;
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t lo = n * t / T, hi = n * (t + 1) / T, i = lo;
        uint32_t* a = h + (size_t)t * SUBS * 65536;
        for (; i + SUBS <= hi; i += SUBS)
            for (int k = 0; k < SUBS; k++) a[k * 65536 + p[i + k]]++;
        for (; i < hi; i++) a[p[i]]++;
    }
    memset(s, 0, sizeof *s);
    s->min = INFINITY; s->max = -INFINITY;
    for (int v = 0; v < 65536; v++) {
        uint64_t c = 0;
        for (int k = 0; k < nt * SUBS; k++) c += h[(size_t)k * 65536 + v];
        if (!c) continue;
        double x = is_bf16 ? from_bf16((uint16_t)v) : from_f16((uint16_t)v);
        if (isnan(x)) { s->n_nan += c; continue; }
        if (isinf(x)) { if (x > 0) s->n_posinf += c; else s->n_neginf += c; continue; }
        double d = x - shift;
        s->n_finite += c; s->sum += (double)c * d; s->sumsq += (double)c * d * d;
        if ((v & 0x7fff) == 0) s->n_zero += c;
        if (x < s->min) s->min = x;
        if (x > s->max) s->max = x;
    }
    free(h);
    return 0;
}

enum { F64 = 0, F32 = 1, BF16 = 2, F16 = 3 };
static const int ITEMSIZE[] = {8, 4, 2, 2};

int64_t stats_chunk(void) { return CHUNK; }
int64_t stats_hist_min(void) { return HIST_MIN; }

static void fold(stats_t* acc, const stats_t* s) {
    acc->n_finite += s->n_finite; acc->n_nan += s->n_nan; acc->n_posinf += s->n_posinf;
    acc->n_neginf += s->n_neginf; acc->n_zero += s->n_zero; acc->sum += s->sum; acc->sumsq += s->sumsq;
    if (s->min < acc->min) acc->min = s->min;
    if (s->max > acc->max) acc->max = s->max;
}

/* Fold n elements at p into *acc: large 16-bit windows through the histograms, everything else in
   chunks in parallel whose partials are folded in chunk order. */
int stats_update(stats_t* acc, const void* p, int64_t n, int dtype, double shift) {
    if ((dtype == BF16 || dtype == F16) && n >= HIST_MIN && n < ((int64_t)1 << 32)) {
        stats_t s;
        if (hist_stats((const uint16_t*)p, n, dtype == BF16, shift, &s)) return 1;
        fold(acc, &s);
        return 0;
    }
    int64_t nc = (n + CHUNK - 1) / CHUNK;
    stats_t* part = malloc((size_t)(nc ? nc : 1) * sizeof(stats_t));
    if (!part) return 1;
    #pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (int64_t c = 0; c < nc; c++) {
        const char* q = (const char*)p + c * CHUNK * ITEMSIZE[dtype];
        int64_t m = n - c * CHUNK < CHUNK ? n - c * CHUNK : CHUNK;
        switch (dtype) {
            case F64: chunk_f64((const uint64_t*)q, m, shift, &part[c]); break;
            case F32: chunk_f32((const uint32_t*)q, m, shift, &part[c]); break;
            case BF16: chunk_bf16((const uint16_t*)q, m, shift, &part[c]); break;
            default: chunk_f16((const uint16_t*)q, m, shift, &part[c]); break;
        }
    }
    for (int64_t c = 0; c < nc; c++) fold(acc, &part[c]);
    free(part);
    return 0;
}
