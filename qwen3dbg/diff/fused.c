/* The differ's per-tap comparison and logits kernels, built on first use by fused.py (which documents them). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#include "../util/widen.h"

#define CHUNK 65536        /* elements per partial sum */
#define BLOCK 256          /* elements widened to double at a time (stays in L1) */
#define PAR_MIN (1 << 23)  /* below this, waking a second thread costs more than it saves */
#define ROW_SUMS 9         /* per-row sums (rows_add) */

typedef struct {
    int64_t count, nonfinite_ref, nonfinite_cand, nonfinite_gold, mask_diff, over;
    int64_t argmax, argmin;  /* first flat index of the candidate error's max / min */
    double ss_cand, ss_ref, ss_gold, ss_diff, dot;  /* sums of err_c^2, err_r^2, gold^2, (err_c - err_r)^2, err_c . gold */
    double max_cand, min_cand, absmax_ref, absmax_gold;
    double head[ROW_SUMS];  /* the row sums (below) of a row that began in an earlier chunk */
} cmp_t;

typedef struct {
    const void* p[3];  /* gold, ref, cand */
    int dtype[3];
    double masked_at[3];  /* attention scores at or below this are masked (finfo.min / 2 of the element type) */
    int scores;
    const uint8_t* keep;  /* optional: 0 leaves an element out */
    double limit;         /* count candidate |err| above it */
    int64_t row;          /* > 0: per row of this many elements, over judged elements, sum c - r, (c - r) * g, */
    double* rows[ROW_SUMS]; /* r - g, (r - g) * g, (c - g)^2, (r - g)^2, g^2, the count judged and g^4 */
} args_t;

enum { F64 = 0, F32 = 1, BF16 = 2, F16 = 3 };

static void widen(const void* p, int dtype, int64_t off, int64_t n, double* out) {
    switch (dtype) {
        case F32: { const uint32_t* q = (const uint32_t*)p + off; for (int64_t i = 0; i < n; i++) out[i] = from_f32(q[i]); break; }
        case BF16: { const uint16_t* q = (const uint16_t*)p + off; for (int64_t i = 0; i < n; i++) out[i] = from_bf16(q[i]); break; }
        default: { const uint16_t* q = (const uint16_t*)p + off; for (int64_t i = 0; i < n; i++) out[i] = from_f16(q[i]); break; }
    }
}

/* One block with every element judged, the common case: no selects. finite-math-only lets the max/min
   reductions vectorize; a NaN or inf anywhere makes a sum non-finite, and the caller (compiled without the
   option, so it can see that) then redoes the block with `block` below. */
typedef struct { double ssc, ssr, ssg, ssd, dot, mx, mn, ar, ag; int64_t over; } fast_t;
__attribute__((optimize("finite-math-only"))) static void block_fast(const double* g, const double* r, const double* c,
                                                                     int64_t n, double limit, fast_t* f) {
    double ssc = 0, ssr = 0, ssg = 0, ssd = 0, dot = 0, mx = -INFINITY, mn = INFINITY, ar = 0, ag = 0;
    int64_t over = 0;
    for (int64_t i = 0; i < n; i++) {
        double gv = g[i], ec = c[i] - gv, er = r[i] - gv, d = ec - er;
        ssc += ec * ec; ssr += er * er; ssg += gv * gv; ssd += d * d; dot += ec * gv;
        mx = ec > mx ? ec : mx; mn = ec < mn ? ec : mn;
        ar = fabs(er) > ar ? fabs(er) : ar; ag = fabs(gv) > ag ? fabs(gv) : ag;
        over += fabs(ec) > limit;
    }
    f->ssc = ssc; f->ssr = ssr; f->ssg = ssg; f->ssd = ssd; f->dot = dot; f->mx = mx; f->mn = mn; f->ar = ar; f->ag = ag;
    f->over = over;
}

static int finite_bits(double x) { uint64_t u; memcpy(&u, &x, 8); return (u & 0x7ff0000000000000ULL) != 0x7ff0000000000000ULL; }

/* The largest of n >= 1 finite values (a vectorized reduction, as above). */
__attribute__((optimize("finite-math-only"))) static double block_max(const double* x, int64_t n) {
    double m = x[0];
    for (int64_t i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* One block: an element is judged when the golden is finite, no side masks it (scores only), `keep`
   keeps it and both sides are finite; elsewhere both errors and the golden count as 0, as in
   torch.where(judged, ., 0). A golden NaN/inf that nothing masks or drops is counted: fp64 cannot be
   non-finite there unless the weights or inputs are. */
static inline void block(const double* g, const double* r, const double* c, const uint8_t* keep, int64_t n,
                         int64_t base, const args_t* a, cmp_t* s, const int scores, const int has_keep,
                         double* dd, double* ee, double* gg, double* jj) {
    double e[BLOCK], ne[BLOCK], aer[BLOCK], agj[BLOCK];
    int64_t cnt = 0, nfr = 0, nfc = 0, nfg = 0, md = 0, over = 0;
    double ssc = 0, ssr = 0, ssg = 0, ssd = 0, dot = 0;
    const double tg = a->masked_at[0], tr = a->masked_at[1], tc = a->masked_at[2], limit = a->limit;
    for (int64_t i = 0; i < n; i++) {
        double gv = g[i], rv = r[i], cv = c[i];
        int64_t fg = fabs(gv) < INFINITY, fr = fabs(rv) < INFINITY, fc = fabs(cv) < INFINITY;
        int64_t mg = scores ? gv <= tg : 0, mr = scores ? rv <= tr : 0, mc = scores ? cv <= tc : 0;
        int64_t live = ~(mg | mr | mc) & 1 & (has_keep ? (int64_t)(keep[i] != 0) : 1), valid = fg & live;
        md += mg ^ mc;
        nfg += ~fg & live;
        nfr += valid & ~fr & 1;
        nfc += valid & ~fc & 1;
        int64_t j = valid & fr & fc;
        double ec = j ? cv - gv : 0.0, er = j ? rv - gv : 0.0, gj = j ? gv : 0.0, d = ec - er;
        cnt += j;
        ssc += ec * ec; ssr += er * er; ssg += gj * gj; ssd += d * d; dot += ec * gj;
        over += fabs(ec) > limit;
        e[i] = ec; ne[i] = -ec; aer[i] = fabs(er); agj[i] = fabs(gj); dd[i] = d; ee[i] = er; gg[i] = gj; jj[i] = j;
    }
    double mx = block_max(e, n), mn = -block_max(ne, n), ar = block_max(aer, n), ag = block_max(agj, n);
    if (mx > s->max_cand) { int64_t i = 0; while (e[i] != mx) i++; s->max_cand = mx; s->argmax = base + i; }
    if (mn < s->min_cand) { int64_t i = 0; while (e[i] != mn) i++; s->min_cand = mn; s->argmin = base + i; }
    s->count += cnt; s->nonfinite_ref += nfr; s->nonfinite_cand += nfc; s->nonfinite_gold += nfg;
    s->mask_diff += md; s->over += over;
    s->ss_cand += ssc; s->ss_ref += ssr; s->ss_gold += ssg; s->ss_diff += ssd; s->dot += dot;
    s->absmax_ref = ar > s->absmax_ref ? ar : s->absmax_ref;
    s->absmax_gold = ag > s->absmax_gold ? ag : s->absmax_gold;
}

/* Per row: the signed sums of the systematic-deviation test, d = c - r and e = r - g (0 where not judged),
   alone and times the golden g; and the row rule's sums, (c - g)^2 = (d + e)^2, e^2, g^2, the count of judged
   elements (jj: 1 judged, 0 not; NULL: all judged) and g^4. A row that began before this chunk
   goes to its head, which compare() folds in chunk order afterwards, so the sums do not depend on the thread
   count; rows that begin here are this chunk's alone. */
static void rows_add(const double* d, const double* e, const double* g, const double* jj, int64_t b, int64_t m,
                     int64_t lo, const args_t* a, cmp_t* s) {
    for (int64_t i = 0; i < m;) {
        int64_t row = (b + i) / a->row, end = (row + 1) * a->row - b;
        if (end > m) end = m;
        double sum[ROW_SUMS] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t j = i; j < end; j++) {
            double ec = d[j] + e[j];
            sum[0] += d[j]; sum[1] += d[j] * g[j]; sum[2] += e[j]; sum[3] += e[j] * g[j];
            double g2 = g[j] * g[j];
            sum[4] += ec * ec; sum[5] += e[j] * e[j]; sum[6] += g2; sum[8] += g2 * g2;
        }
        if (jj) for (int64_t j = i; j < end; j++) sum[7] += jj[j]; else sum[7] = (double)(end - i);
        for (int k = 0; k < ROW_SUMS; k++) {
            if (row * a->row < lo) s->head[k] += sum[k]; else a->rows[k][row] += sum[k];
        }
        i = end;
    }
}

static void init(cmp_t* s) {
    memset(s, 0, sizeof *s);
    s->max_cand = -INFINITY; s->min_cand = INFINITY;
}

/* Elements off..off+n of a tensor as doubles: float64 in place, anything else widened into buf. */
static const double* view(const void* p, int dtype, int64_t off, int64_t n, double* buf) {
    if (dtype == F64) return (const double*)p + off;
    widen(p, dtype, off, n, buf);
    return buf;
}

static void chunk(const args_t* a, int64_t lo, int64_t n, cmp_t* s) {
    double gb[BLOCK], rb[BLOCK], cb[BLOCK], dd[BLOCK], ee[BLOCK], gg[BLOCK], jj[BLOCK];
    init(s);
    for (int64_t b = lo; b < lo + n; b += BLOCK) {
        int64_t m = lo + n - b < BLOCK ? lo + n - b : BLOCK;
        const double *g = view(a->p[0], a->dtype[0], b, m, gb), *r = view(a->p[1], a->dtype[1], b, m, rb),
                     *c = view(a->p[2], a->dtype[2], b, m, cb);
        const uint8_t* k = a->keep ? a->keep + b : 0;
        if (!a->scores && !k) {
            fast_t f;
            block_fast(g, r, c, m, a->limit, &f);
            if (finite_bits(f.ssc) && finite_bits(f.ssr) && finite_bits(f.ssg)) {
                if (f.mx > s->max_cand) { int64_t i = 0; while (c[i] - g[i] != f.mx) i++; s->max_cand = f.mx; s->argmax = b + i; }
                if (f.mn < s->min_cand) { int64_t i = 0; while (c[i] - g[i] != f.mn) i++; s->min_cand = f.mn; s->argmin = b + i; }
                s->count += m; s->over += f.over;
                s->ss_cand += f.ssc; s->ss_ref += f.ssr; s->ss_gold += f.ssg; s->ss_diff += f.ssd; s->dot += f.dot;
                s->absmax_ref = f.ar > s->absmax_ref ? f.ar : s->absmax_ref;
                s->absmax_gold = f.ag > s->absmax_gold ? f.ag : s->absmax_gold;
                if (a->row) {
                    for (int64_t i = 0; i < m; i++) { dd[i] = c[i] - r[i]; ee[i] = r[i] - g[i]; }
                    rows_add(dd, ee, g, 0, b, m, lo, a, s);
                }
                continue;
            }
        }
        /* constant flags: the compiler specializes the loop for each case */
        if (a->scores) { if (k) block(g, r, c, k, m, b, a, s, 1, 1, dd, ee, gg, jj); else block(g, r, c, k, m, b, a, s, 1, 0, dd, ee, gg, jj); }
        else { if (k) block(g, r, c, k, m, b, a, s, 0, 1, dd, ee, gg, jj); else block(g, r, c, k, m, b, a, s, 0, 0, dd, ee, gg, jj); }
        if (a->row) rows_add(dd, ee, gg, jj, b, m, lo, a, s);
    }
}

static void fold(cmp_t* acc, const cmp_t* s) {
    if (s->max_cand > acc->max_cand) { acc->max_cand = s->max_cand; acc->argmax = s->argmax; }
    if (s->min_cand < acc->min_cand) { acc->min_cand = s->min_cand; acc->argmin = s->argmin; }
    acc->count += s->count; acc->nonfinite_ref += s->nonfinite_ref; acc->nonfinite_cand += s->nonfinite_cand;
    acc->nonfinite_gold += s->nonfinite_gold;
    acc->mask_diff += s->mask_diff; acc->over += s->over;
    acc->ss_cand += s->ss_cand; acc->ss_ref += s->ss_ref; acc->ss_gold += s->ss_gold; acc->ss_diff += s->ss_diff;
    acc->dot += s->dot;
    if (s->absmax_ref > acc->absmax_ref) acc->absmax_ref = s->absmax_ref;
    if (s->absmax_gold > acc->absmax_gold) acc->absmax_gold = s->absmax_gold;
}

/* exp(x) for x <= 0, vectorizable (libm's exp is a call per element): x = n ln2 + t with ln2 in two parts
   (n ln2hi exact), e^t by its Taylor series to t^13 (|t| <= ln2/2: truncation 4e-18), scaled by 2^n; below
   2^-1022 it returns 0 (a subnormal term does not move a sum that holds a 1). Within a few ulp of exp. */
static inline double exp_neg(double x) {
    double n = floor(x * 1.4426950408889634 + 0.5);
    double t = x - n * 6.93147180369123816490e-01 - n * 1.90821492927058770002e-10;
    double q = 1.0 / 6227020800.0;
    static const double inv[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                                   1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0,
                                   0.5, 1.0, 1.0};
    for (int k = 0; k < 13; k++) q = q * t + inv[k];
    /* 2^n from the bits: adding 1.5 * 2^52 puts n in the low mantissa bits (no double-to-int conversion,
       which AVX2 lacks); + 1023 shifted into the exponent field. */
    double shifted = (n < -1022 ? -1022 : n) + 6755399441055744.0, scale;
    uint64_t bits;
    memcpy(&bits, &shifted, 8);
    bits = (bits + 1023) << 52;
    memcpy(&scale, &bits, 8);
    return n < -1022 ? 0.0 : q * scale;
}

/* NaN above everything (as torch.argmax and torch.topk); equal values keep the earlier index. */
static inline int above(double x, double y) { return (isnan(x) && !isnan(y)) || x > y; }

/* One pass over a row: its first argmax, its largest value, whether it is finite, and its top k indices
   (k <= TOPK_MAX, largest first; ties to the earlier index). */
#define TOPK_MAX 16
static void row_scan(const void* p, int dtype, int64_t off, int64_t n, int k, int64_t* top, double* max, int* finite) {
    double buf[BLOCK], val[TOPK_MAX];
    int filled = 0;
    *finite = 1;
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t len = n - b < BLOCK ? n - b : BLOCK;
        const double* x = view(p, dtype, off + b, len, buf);
        double bm = -INFINITY;
        int64_t bad = 0;
        for (int64_t i = 0; i < len; i++) { bm = x[i] > bm ? x[i] : bm; bad += !(fabs(x[i]) < INFINITY); }
        if (!bad && filled == k && !(bm > val[k - 1])) continue;  /* most blocks: nothing enters the top k */
        for (int64_t i = 0; i < len; i++) {
            double v = x[i];
            if (!(fabs(v) < INFINITY)) *finite = 0;
            if (filled == k && !above(v, val[k - 1])) continue;
            int j = filled < k ? filled++ : k - 1;
            while (j > 0 && above(v, val[j - 1])) { val[j] = val[j - 1]; top[j] = top[j - 1]; j--; }
            val[j] = v; top[j] = b + i;
        }
    }
    *max = filled ? val[0] : -INFINITY;
}

/* Per row of gold and of each side ([rows, V] each; p[0] the golden): every tensor's argmax (= its top
   index) and top k, whether golden and side are both finite, and for finite rows KL(softmax gold ||
   softmax side) = sum p (g - s) - (lse_g - lse_s), lse = max + log sum e^(x - max). The golden's row is
   read twice, whatever the number of sides. */
void logits_rows(const void* const* p, const int* dt, int sides, int64_t rows, int64_t V, int k, int64_t* top,
                 double* kl, uint8_t* ok) {
    #pragma omp parallel for schedule(static) if (rows * V * (sides + 1) >= PAR_MIN)
    for (int64_t row = 0; row < rows; row++) {
        double m[3], buf[3][BLOCK], sum[3] = {0, 0, 0}, t[3] = {0, 0, 0};
        int fin[3];
        for (int s = 0; s <= sides; s++)
            row_scan(p[s], dt[s], row * V, V, k, top + (s * rows + row) * k, &m[s], &fin[s]);
        int any = 0;
        for (int s = 1; s <= sides; s++) {
            ok[(s - 1) * rows + row] = fin[0] && fin[s] && V > 0;
            kl[(s - 1) * rows + row] = 0;
            any |= ok[(s - 1) * rows + row];
        }
        if (!any) continue;
        for (int64_t b = 0; b < V; b += BLOCK) {
            int64_t len = V - b < BLOCK ? V - b : BLOCK;
            const double* x[3];
            for (int s = 0; s <= sides; s++) x[s] = view(p[s], dt[s], row * V + b, len, buf[s]);
            for (int64_t i = 0; i < len; i++) {
                double eg = exp_neg(x[0][i] - m[0]);
                sum[0] += eg;
                for (int s = 1; s <= sides; s++) { sum[s] += exp_neg(x[s][i] - m[s]); t[s] += eg * (x[0][i] - x[s][i]); }
            }
        }
        for (int s = 1; s <= sides; s++)
            if (ok[(s - 1) * rows + row])
                kl[(s - 1) * rows + row] = t[s] / sum[0] - ((m[0] - m[s]) + (log(sum[0]) - log(sum[s])));
    }
}

int compare(const args_t* a, int64_t n, cmp_t* out) {
    int64_t nc = (n + CHUNK - 1) / CHUNK;
    cmp_t* part = malloc((size_t)(nc ? nc : 1) * sizeof(cmp_t));
    if (!part) return 1;
    #pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (int64_t i = 0; i < nc; i++) chunk(a, i * CHUNK, n - i * CHUNK < CHUNK ? n - i * CHUNK : CHUNK, &part[i]);
    init(out);
    for (int64_t i = 0; i < nc; i++) {
        fold(out, &part[i]);
        if (a->row && (i * CHUNK) % a->row)
            for (int k = 0; k < ROW_SUMS; k++) a->rows[k][i * CHUNK / a->row] += part[i].head[k];
    }
    free(part);
    return 0;
}
