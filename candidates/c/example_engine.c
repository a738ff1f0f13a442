/* example_engine.c — a plain-C float32 Qwen3 (dense) with a KV cache that writes every tap through
   qwen3dbg_taps.h: the worked example of instrumenting a C engine for `qwen3dbg diff --cand store:DIR`.

   Reads config.json and a single model.safetensors (F32, BF16 or F16) with a minimal JSON scan that
   is enough for Hugging Face-style files. Batch 1; the prompt is prefilled as step 0 and each forced
   decode id is one more step.

   Build:  cc -std=c99 -O2 -Wall -o example_engine example_engine.c -lm
           (add -DPLANT_ROPE_BUG to plant a wrong RoPE theta, 10000 instead of the config's)
   Run:    example_engine MODEL_DIR OUT_DIR 9,41,7,300 [--decode 5,17] [--crash-after STEP] [--no-attention-matrices 1]
                          [--tp RANK/WORLD [--plant-kv-offset RANK] [--plant-partial-scale RANK]]
   --crash-after exits abruptly after that step, leaving a store whose manifest says incomplete;
   --no-attention-matrices declares attn_scores and attn_probs missing instead of writing them.

   Tensor parallelism, simulated: `--tp 1/2` writes the store of rank 1 of a TP=2 run, holding what that rank
   holds (run it once per rank, then `qwen3dbg diff --cand store:OUT0,OUT1`). Each process computes every rank's
   work, so the all-reduces (summing the ranks' partials in rank order) need no communication. Rank r holds
   query heads and gate/up channels r*n/WORLD..(r+1)*n/WORLD-1 and its kv heads (each kv head on several ranks
   when there are fewer kv heads than ranks); o_proj and mlp.out are its partial sums before the all-reduce;
   norms, residuals and logits are replicated. Planted one-rank bugs: --plant-kv-offset R makes rank R read
   its kv heads at offset 0 (another rank's heads), --plant-partial-scale R halves rank R's o_proj partial.
*/
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define QWEN3DBG_TAPS_IMPLEMENTATION
#include "qwen3dbg_taps.h"

static void die(const char *what, const char *detail) {
    fprintf(stderr, "example_engine: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(2);
}

static char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;
    if (!f) die("cannot open", path);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    rewind(f);
    buf = (char *)malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) die("cannot read", path);
    buf[n] = '\0';
    fclose(f);
    if (size) *size = (size_t)n;
    return buf;
}

/* ---- minimal JSON scanning: enough for config.json and a safetensors header ---- */

/* The text just after `"key":` (whitespace skipped), or NULL. Keys of our files are unique. */
static const char *json_value(const char *json, const char *key) {
    char quoted[256];
    const char *p;
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    p = strstr(json, quoted);
    if (!p) return NULL;
    p += strlen(quoted);
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
    if (*p++ != ':') return NULL;
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
    return p;
}

static double json_number(const char *json, const char *key, double fallback) {
    const char *v = json_value(json, key);
    return v && *v != 'n' ? strtod(v, NULL) : fallback;
}

static int json_int(const char *json, const char *key) {
    const char *v = json_value(json, key);
    if (!v) die("config.json lacks", key);
    return (int)strtol(v, NULL, 10);
}

typedef struct {
    int vocab, hidden, inter, layers, heads, kv_heads, head_dim, tied;
    float eps, theta;
} Config;

typedef struct {
    float *attn_norm, *q, *k, *v, *o, *q_norm, *k_norm, *mlp_norm, *gate, *up, *down;
    float *k_cache, *v_cache; /* [nKV][max_seq][D] */
} Layer;

typedef struct {
    Config c;
    char *config;    /* config.json's text, also copied into the store's manifest */
    char *st;        /* the whole safetensors file */
    const char *hdr; /* its JSON header, NUL-terminated copy */
    const unsigned char *data;
    float *embed, *final_norm, *lm_head;
    Layer *layer;
    int max_seq, len; /* cache capacity and fill */
} Model;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023u, bits;
    float out;
    if (exp == 0) return (sign ? -1.0f : 1.0f) * ldexpf((float)man, -24);
    bits = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    memcpy(&out, &bits, 4);
    return out;
}

/* Tensor `name` as a new float32 array of exactly `numel` elements. */
static float *load(const Model *m, const char *name, size_t numel) {
    const char *v = json_value(m->hdr, name), *dt, *off;
    long long begin, end;
    size_t i, item;
    float *out;
    if (!v) die("model.safetensors has no tensor", name);
    dt = json_value(v, "dtype");
    off = json_value(v, "data_offsets");
    if (!dt || !off) die("malformed safetensors entry", name);
    item = !strncmp(dt, "\"F32\"", 5) ? 4 : (!strncmp(dt, "\"BF16\"", 6) || !strncmp(dt, "\"F16\"", 5)) ? 2 : 0;
    if (!item) die("unsupported dtype (F32, BF16, F16 only) of", name);
    begin = strtoll(off + 1, (char **)&off, 10);
    end = strtoll(off + 1, NULL, 10);
    if ((size_t)(end - begin) != numel * item) die("tensor size does not match the config for", name);
    out = (float *)malloc(numel * sizeof(float));
    if (!out) die("out of memory loading", name);
    for (i = 0; i < numel; i++) {
        const unsigned char *p = m->data + begin + i * item;
        if (item == 4) {
            memcpy(&out[i], p, 4);
        } else if (dt[1] == 'B') {
            uint32_t bits = (uint32_t)(p[0] | (p[1] << 8)) << 16;
            memcpy(&out[i], &bits, 4);
        } else {
            out[i] = half_to_float((uint16_t)(p[0] | (p[1] << 8)));
        }
    }
    return out;
}

static float *layer_tensor(const Model *m, int i, const char *what, size_t numel) {
    char name[256];
    snprintf(name, sizeof name, "model.layers.%d.%s.weight", i, what);
    return load(m, name, numel);
}

static void load_model(Model *m, const char *dir, int max_seq) {
    char path[4096];
    const char *cfg;
    size_t size;
    uint64_t hlen = 0;
    int i, b;
    Config *c = &m->c;
    snprintf(path, sizeof path, "%s/config.json", dir);
    cfg = m->config = read_file(path, NULL);
    c->vocab = json_int(cfg, "vocab_size");
    c->hidden = json_int(cfg, "hidden_size");
    c->inter = json_int(cfg, "intermediate_size");
    c->layers = json_int(cfg, "num_hidden_layers");
    c->heads = json_int(cfg, "num_attention_heads");
    c->kv_heads = json_int(cfg, "num_key_value_heads");
    c->head_dim = json_value(cfg, "head_dim") ? json_int(cfg, "head_dim") : c->hidden / c->heads;
    c->eps = (float)json_number(cfg, "rms_norm_eps", 1e-6);
    c->theta = (float)json_number(cfg, "rope_theta", 1e6);
    c->tied = json_value(cfg, "tie_word_embeddings") && !strncmp(json_value(cfg, "tie_word_embeddings"), "true", 4);
    if (json_value(cfg, "num_experts") && json_number(cfg, "num_experts", 0) > 0)
        die("this example engine runs dense Qwen3 only", dir);

    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    m->st = read_file(path, &size);
    for (b = 0; b < 8; b++) hlen |= (uint64_t)(unsigned char)m->st[b] << (8 * b);
    if (8 + hlen > size) die("not a safetensors file", path);
    m->hdr = (char *)malloc(hlen + 1);
    memcpy((char *)m->hdr, m->st + 8, hlen);
    ((char *)m->hdr)[hlen] = '\0';
    m->data = (const unsigned char *)m->st + 8 + hlen;

    {
        size_t H = c->hidden, D = c->head_dim, Q = (size_t)c->heads * D, KV = (size_t)c->kv_heads * D, I = c->inter;
        m->embed = load(m, "model.embed_tokens.weight", (size_t)c->vocab * H);
        m->final_norm = load(m, "model.norm.weight", H);
        m->lm_head = c->tied ? m->embed : load(m, "lm_head.weight", (size_t)c->vocab * H);
        m->layer = (Layer *)calloc((size_t)c->layers, sizeof(Layer));
        for (i = 0; i < c->layers; i++) {
            Layer *L = &m->layer[i];
            L->attn_norm = layer_tensor(m, i, "input_layernorm", H);
            L->q = layer_tensor(m, i, "self_attn.q_proj", Q * H);
            L->k = layer_tensor(m, i, "self_attn.k_proj", KV * H);
            L->v = layer_tensor(m, i, "self_attn.v_proj", KV * H);
            L->o = layer_tensor(m, i, "self_attn.o_proj", H * Q);
            L->q_norm = layer_tensor(m, i, "self_attn.q_norm", D);
            L->k_norm = layer_tensor(m, i, "self_attn.k_norm", D);
            L->mlp_norm = layer_tensor(m, i, "post_attention_layernorm", H);
            L->gate = layer_tensor(m, i, "mlp.gate_proj", I * H);
            L->up = layer_tensor(m, i, "mlp.up_proj", I * H);
            L->down = layer_tensor(m, i, "mlp.down_proj", H * I);
            L->k_cache = (float *)calloc(KV * (size_t)max_seq, sizeof(float));
            L->v_cache = (float *)calloc(KV * (size_t)max_seq, sizeof(float));
        }
    }
    m->max_seq = max_seq;
    m->len = 0;
}

/* ---- pure math (row-major, float32 values; sums accumulate in double, as CPU reference code often does) ---- */

/* y[T,O] = x[T,N] @ W[O,N]^T */
static void linear(float *y, const float *x, const float *w, int T, int N, int O) {
    int t, o, n;
    for (t = 0; t < T; t++)
        for (o = 0; o < O; o++) {
            double acc = 0.0;
            for (n = 0; n < N; n++) acc += (double)x[(size_t)t * N + n] * w[(size_t)o * N + n];
            y[(size_t)t * O + o] = (float)acc;
        }
}

/* y[T,O] = x[:, lo:hi] @ W[:, lo:hi]^T: one rank's partial sum of a row-parallel linear over input columns lo..hi-1. */
static void linear_cols(float *y, const float *x, const float *w, int T, int N, int O, int lo, int hi) {
    int t, o, n;
    for (t = 0; t < T; t++)
        for (o = 0; o < O; o++) {
            double acc = 0.0;
            for (n = lo; n < hi; n++) acc += (double)x[(size_t)t * N + n] * w[(size_t)o * N + n];
            y[(size_t)t * O + o] = (float)acc;
        }
}

/* RMSNorm of each of `rows` rows of length n: normalise, then multiply by the weight (transformers' order). */
static void rms_norm(float *y, const float *x, const float *w, int rows, int n, float eps) {
    int r, i;
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        double ss = 0.0;
        float inv;
        for (i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        inv = (float)(1.0 / sqrt(ss / n + eps));
        for (i = 0; i < n; i++) y[(size_t)r * n + i] = w[i] * (xr[i] * inv);
    }
}

/* Rotate-half RoPE in place on x[T,nHeads,D]: pairs (i, i + D/2) rotate by pos * theta^(-2i/D). */
static void rope(float *x, const int64_t *pos, int T, int heads, int D, float theta) {
    int t, h, i, half = D / 2;
    for (t = 0; t < T; t++)
        for (i = 0; i < half; i++) {
            float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)D);
            float angle = (float)pos[t] * inv_freq, c = cosf(angle), s = sinf(angle);
            for (h = 0; h < heads; h++) {
                float *v = x + ((size_t)t * heads + h) * D;
                float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

/* ---- the forward step ---- */

static int skip_attention_matrices;

/* Tensor parallelism (--tp): this process's rank, the world size (0: a whole run), the planted bugs' ranks. */
static int tp_rank, tp_world, kv_offset_bug = -1, partial_scale_bug = -1;

typedef struct { int lo, hi; } Range;

/* Rank r's share of n units (heads or channels); with fewer units than ranks, the unit it shares with others. */
static Range share(int n, int r) {
    Range g;
    g.lo = n * r / tp_world;
    g.hi = n >= tp_world ? n * (r + 1) / tp_world : g.lo + 1;
    return g;
}

static void tap(q3t_store *s, const char *name, int layer, int ndim, const int64_t *shape, const float *data) {
    char full[128];
    if (layer >= 0)
        snprintf(full, sizeof full, "layers.%d.%s", layer, name);
    else
        snprintf(full, sizeof full, "%s", name);
    if (q3t_write(s, full, Q3T_F32, ndim, shape, data)) die("tap store", q3t_error(s));
}

/* This rank's slice [lo, hi) of `axis` of a tap of `shape`, or the whole tap outside a TP run. */
static void tap_slice(q3t_store *s, const char *name, int layer, int ndim, const int64_t *shape, const float *data,
                      int axis, Range slice) {
    int64_t sub[8], outer = 1, inner = 1, o;
    int d, n = slice.hi - slice.lo;
    float *buf;
    if (!tp_world) {
        tap(s, name, layer, ndim, shape, data);
        return;
    }
    for (d = 0; d < ndim; d++) {
        sub[d] = d == axis ? n : shape[d];
        if (d < axis) outer *= shape[d];
        if (d > axis) inner *= shape[d];
    }
    buf = (float *)malloc(sizeof(float) * (size_t)(outer * n * inner));
    for (o = 0; o < outer; o++)
        memcpy(buf + (size_t)(o * n * inner), data + (size_t)((o * shape[axis] + slice.lo) * inner), sizeof(float) * (size_t)(n * inner));
    tap(s, name, layer, ndim, sub, buf);
    free(buf);
}

/* A row-parallel linear y[T,O] = x[T,N] @ W^T: whole outside a TP run; in one, every rank's partial over its
   input columns (`unit` of them per head or channel of `n`), summed in rank order as the all-reduce does; this
   rank's partial goes to `mine`. */
static void linear_rows(float *y, float *mine, const float *x, const float *w, int T, int N, int O, int n, int unit,
                        int scaled_rank) {
    int r, j;
    float *part;
    if (!tp_world) {
        linear(y, x, w, T, N, O);
        return;
    }
    part = (float *)malloc(sizeof(float) * T * O);
    for (r = 0; r < tp_world; r++) {
        Range g = share(n, r);
        linear_cols(part, x, w, T, N, O, g.lo * unit, g.hi * unit);
        if (r == scaled_rank)
            for (j = 0; j < T * O; j++) part[j] *= 0.5f; /* the planted bug: a partial scaled on one rank */
        for (j = 0; j < T * O; j++) y[j] = r ? y[j] + part[j] : part[j];
        if (r == tp_rank) memcpy(mine, part, sizeof(float) * T * O);
    }
    free(part);
}

static void step(Model *m, q3t_store *s, const int64_t *ids, const int64_t *pos, int T) {
    const Config *c = &m->c;
    int H = c->hidden, D = c->head_dim, nH = c->heads, nKV = c->kv_heads, I = c->inter, V = c->vocab;
    int Q = nH * D, KV = nKV * D, S = m->len + T, rep = nH / nKV, i, t, h, j, d;
    float theta = c->theta, scale = 1.0f / sqrtf((float)D);
    float *x = (float *)malloc(sizeof(float) * T * H), *hn = (float *)malloc(sizeof(float) * T * H);
    float *q = (float *)malloc(sizeof(float) * T * Q), *k = (float *)malloc(sizeof(float) * T * KV);
    float *v = (float *)malloc(sizeof(float) * T * KV), *att = (float *)malloc(sizeof(float) * T * Q);
    float *o = (float *)malloc(sizeof(float) * T * H), *g = (float *)malloc(sizeof(float) * T * I);
    float *u = (float *)malloc(sizeof(float) * T * I), *a = (float *)malloc(sizeof(float) * T * I);
    float *sc = (float *)malloc(sizeof(float) * nH * T * S), *pr = (float *)malloc(sizeof(float) * nH * T * S);
    float *cache = (float *)malloc(sizeof(float) * KV * S);
    float *logits = (float *)malloc(sizeof(float) * T * V), *mine = (float *)malloc(sizeof(float) * T * H);
    Range qh = {0, nH}, kvh = {0, nKV}, ch = {0, I};
    int64_t sh_h[3] = {1, T, H}, sh_q[3] = {1, T, Q}, sh_kv[3] = {1, T, KV}, sh_i[3] = {1, T, I};
    int64_t sh_qh[4] = {1, T, nH, D}, sh_kh[4] = {1, T, nKV, D}, sh_c[4] = {1, nKV, m->len ? T : S, D};
    size_t first = m->len ? (size_t)m->len : 0; /* the first cache slot the step's cache taps hold */
    if (m->len && q3t_step_positions(s, Q3T_CACHE_POSITIONS, T, pos)) die("tap store", q3t_error(s));
    int64_t sh_s[4] = {1, nH, T, S}, sh_v[3] = {1, T, V};
#ifdef PLANT_ROPE_BUG
    theta = 10000.0f; /* the planted bug: Llama's theta instead of Qwen3's */
#endif
    if (S > m->max_seq) die("the KV cache is full", NULL);
    if (tp_world) {
        qh = share(nH, tp_rank);
        kvh = share(nKV, tp_rank);
        ch = share(I, tp_rank);
    }

    for (t = 0; t < T; t++) memcpy(x + (size_t)t * H, m->embed + (size_t)ids[t] * H, sizeof(float) * H);
    tap(s, "embed", -1, 3, sh_h, x);
    for (i = 0; i < c->layers; i++) {
        Layer *L = &m->layer[i];
        rms_norm(hn, x, L->attn_norm, T, H, c->eps);
        tap(s, "attn_norm", i, 3, sh_h, hn);
        linear(q, hn, L->q, T, H, Q);
        linear(k, hn, L->k, T, H, KV);
        linear(v, hn, L->v, T, H, KV);
        if (kv_offset_bug >= 0) { /* the planted bug: that rank reads its kv heads' weights at offset 0 */
            Range bad = share(nKV, kv_offset_bug);
            for (t = 0; t < T; t++) {
                memmove(k + ((size_t)t * nKV + bad.lo) * D, k + (size_t)t * nKV * D, sizeof(float) * (bad.hi - bad.lo) * D);
                memmove(v + ((size_t)t * nKV + bad.lo) * D, v + (size_t)t * nKV * D, sizeof(float) * (bad.hi - bad.lo) * D);
            }
        }
        tap_slice(s, "q_proj", i, 3, sh_q, q, 2, (Range){qh.lo * D, qh.hi * D});
        tap_slice(s, "k_proj", i, 3, sh_kv, k, 2, (Range){kvh.lo * D, kvh.hi * D});
        tap_slice(s, "v_proj", i, 3, sh_kv, v, 2, (Range){kvh.lo * D, kvh.hi * D});
        rms_norm(q, q, L->q_norm, T * nH, D, c->eps);
        rms_norm(k, k, L->k_norm, T * nKV, D, c->eps);
        tap_slice(s, "q_norm", i, 4, sh_qh, q, 2, qh);
        tap_slice(s, "k_norm", i, 4, sh_kh, k, 2, kvh);
        rope(q, pos, T, nH, D, theta);
        rope(k, pos, T, nKV, D, theta);
        tap_slice(s, "q_rope", i, 4, sh_qh, q, 2, qh);
        tap_slice(s, "k_rope", i, 4, sh_kh, k, 2, kvh);
        for (t = 0; t < T; t++)
            for (h = 0; h < nKV; h++) {
                size_t slot = ((size_t)h * m->max_seq + m->len + t) * D, src = ((size_t)t * nKV + h) * D;
                memcpy(L->k_cache + slot, k + src, sizeof(float) * D);
                memcpy(L->v_cache + slot, v + src, sizeof(float) * D);
            }
        /* The prefill writes its whole cache; a decode step only the slots it filled (declared below). */
        for (h = 0; h < nKV; h++)
            memcpy(cache + (size_t)h * sh_c[2] * D, L->k_cache + ((size_t)h * m->max_seq + first) * D, sizeof(float) * sh_c[2] * D);
        tap_slice(s, "k_cache", i, 4, sh_c, cache, 1, kvh);
        for (h = 0; h < nKV; h++)
            memcpy(cache + (size_t)h * sh_c[2] * D, L->v_cache + ((size_t)h * m->max_seq + first) * D, sizeof(float) * sh_c[2] * D);
        tap_slice(s, "v_cache", i, 4, sh_c, cache, 1, kvh);
        for (h = 0; h < nH; h++)
            for (t = 0; t < T; t++) {
                const float *qv = q + ((size_t)t * nH + h) * D;
                float *row = sc + ((size_t)h * T + t) * S, *prow = pr + ((size_t)h * T + t) * S, mx = -INFINITY;
                double sum = 0.0;
                for (j = 0; j < S; j++) {
                    const float *kv = L->k_cache + ((size_t)(h / rep) * m->max_seq + j) * D;
                    double dot = 0.0;
                    if (j > pos[t]) {
                        row[j] = -INFINITY;
                        continue;
                    }
                    for (d = 0; d < D; d++) dot += (double)qv[d] * kv[d];
                    row[j] = (float)dot * scale;
                    if (row[j] > mx) mx = row[j];
                }
                for (j = 0; j < S; j++) sum += prow[j] = j > pos[t] ? 0.0f : expf(row[j] - mx);
                for (j = 0; j < S; j++) prow[j] = (float)(prow[j] / sum);
                for (d = 0; d < D; d++) {
                    double acc = 0.0;
                    for (j = 0; j < S; j++) acc += (double)prow[j] * L->v_cache[((size_t)(h / rep) * m->max_seq + j) * D + d];
                    att[((size_t)t * nH + h) * D + d] = (float)acc;
                }
            }
        if (!skip_attention_matrices) { /* declared missing in the manifest instead */
            tap_slice(s, "attn_scores", i, 4, sh_s, sc, 1, qh);
            tap_slice(s, "attn_probs", i, 4, sh_s, pr, 1, qh);
        }
        tap_slice(s, "attn_out", i, 3, sh_q, att, 2, (Range){qh.lo * D, qh.hi * D});
        linear_rows(o, mine, att, L->o, T, Q, H, nH, D, partial_scale_bug);
        tap(s, "o_proj", i, 3, sh_h, tp_world ? mine : o);
        for (j = 0; j < T * H; j++) x[j] += o[j];
        tap(s, "resid_mid", i, 3, sh_h, x);
        rms_norm(hn, x, L->mlp_norm, T, H, c->eps);
        tap(s, "mlp_norm", i, 3, sh_h, hn);
        linear(g, hn, L->gate, T, H, I);
        linear(u, hn, L->up, T, H, I);
        for (j = 0; j < T * I; j++) a[j] = silu(g[j]) * u[j];
        tap_slice(s, "mlp.gate", i, 3, sh_i, g, 2, ch);
        tap_slice(s, "mlp.up", i, 3, sh_i, u, 2, ch);
        tap_slice(s, "mlp.act", i, 3, sh_i, a, 2, ch);
        linear_rows(o, mine, a, L->down, T, I, H, I, 1, -1);
        tap(s, "mlp.out", i, 3, sh_h, tp_world ? mine : o);
        for (j = 0; j < T * H; j++) x[j] += o[j];
        tap(s, "resid_out", i, 3, sh_h, x);
    }
    rms_norm(hn, x, m->final_norm, T, H, c->eps);
    tap(s, "final_norm", -1, 3, sh_h, hn);
    linear(logits, hn, m->lm_head, T, H, V);
    tap(s, "logits", -1, 3, sh_v, logits);
    m->len = S;
    free(x), free(hn), free(q), free(k), free(v), free(att), free(o), free(g), free(u), free(a);
    free(sc), free(pr), free(cache), free(logits), free(mine);
}

static int parse_ids(const char *text, int64_t *out, int cap) {
    int n = 0;
    char *end;
    while (*text) {
        if (n == cap) die("too many token ids", text);
        out[n++] = strtoll(text, &end, 10);
        if (end == text) die("token ids are comma-separated integers", text);
        text = *end == ',' ? end + 1 : end;
    }
    return n;
}

/* This rank's layout of every tap it does not hold whole: the slices `step` writes, and the partial sums. */
static void declare_shards(q3t_store *s, const Config *c) {
    static const char *q_ops[] = {"q_proj", "attn_out"}, *kv_ops[] = {"k_proj", "v_proj"};
    static const char *q_head_ops[] = {"q_norm", "q_rope"}, *kv_head_ops[] = {"k_norm", "k_rope"};
    static const char *ch_ops[] = {"mlp.gate", "mlp.up", "mlp.act"}, *partial_ops[] = {"o_proj", "mlp.out"};
    Range qh = share(c->heads, tp_rank), kvh = share(c->kv_heads, tp_rank), ch = share(c->inter, tp_rank);
    int D = c->head_dim, j, rc = q3t_rank(s, tp_rank, tp_world);
    if (c->heads % tp_world || c->inter % tp_world || (c->kv_heads % tp_world && tp_world % c->kv_heads))
        die("--tp: the world size must divide the heads and the intermediate size, and divide or be divided by the kv heads", NULL);
    for (j = 0; j < 2; j++) {
        rc = rc || q3t_shard(s, q_ops[j], Q3T_SPLIT, 2, (int64_t)qh.lo * D, (int64_t)qh.hi * D);
        rc = rc || q3t_shard(s, kv_ops[j], Q3T_SPLIT, 2, (int64_t)kvh.lo * D, (int64_t)kvh.hi * D);
        rc = rc || q3t_shard(s, q_head_ops[j], Q3T_SPLIT, 2, qh.lo, qh.hi);
        rc = rc || q3t_shard(s, kv_head_ops[j], Q3T_SPLIT, 2, kvh.lo, kvh.hi);
        rc = rc || q3t_shard(s, j ? "v_cache" : "k_cache", Q3T_SPLIT, 1, kvh.lo, kvh.hi);
        rc = rc || q3t_shard(s, j ? "attn_probs" : "attn_scores", Q3T_SPLIT, 1, qh.lo, qh.hi);
        rc = rc || q3t_shard(s, partial_ops[j], Q3T_PARTIAL, 0, 0, 0);
    }
    for (j = 0; j < 3; j++) rc = rc || q3t_shard(s, ch_ops[j], Q3T_SPLIT, 2, ch.lo, ch.hi);
    if (rc) die("tap store", q3t_error(s));
}

int main(int argc, char **argv) {
    static int64_t prompt[4096], decode[4096], positions[4096];
    int n_prompt, n_decode = 0, crash_after = -1, i, t;
    q3t_store *s;
    Model m;
    if (argc < 4) die("usage: example_engine MODEL_DIR OUT_DIR PROMPT_IDS [--decode IDS] [--crash-after STEP] [--no-attention-matrices 1]", NULL);
    n_prompt = parse_ids(argv[3], prompt, 4096);
    for (i = 4; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--decode"))
            n_decode = parse_ids(argv[i + 1], decode, 4096);
        else if (!strcmp(argv[i], "--crash-after"))
            crash_after = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--no-attention-matrices"))
            skip_attention_matrices = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--tp")) {
            if (sscanf(argv[i + 1], "%d/%d", &tp_rank, &tp_world) != 2 || tp_world < 1 || tp_rank < 0 || tp_rank >= tp_world)
                die("--tp is RANK/WORLD with 0 <= RANK < WORLD", argv[i + 1]);
        } else if (!strcmp(argv[i], "--plant-kv-offset"))
            kv_offset_bug = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--plant-partial-scale"))
            partial_scale_bug = atoi(argv[i + 1]);
        else
            die("unknown option", argv[i]);
    }
    memset(&m, 0, sizeof m);
    load_model(&m, argv[1], n_prompt + n_decode);
    for (i = 0; i < n_prompt + n_decode; i++)
        if ((i < n_prompt ? prompt[i] : decode[i - n_prompt]) >= m.c.vocab) die("a token id is outside the vocabulary", NULL);

    if (mkdir(argv[2], 0777) != 0 && errno != EEXIST) die("cannot create", argv[2]);
    s = q3t_open(argv[2], "example_engine.c", "float32", 1);
    if (q3t_error(s)[0] || q3t_manifest_field(s, "config", m.config)) die("tap store", q3t_error(s));
    if (skip_attention_matrices && (q3t_missing(s, "attn_scores") || q3t_missing(s, "attn_probs")))
        die("tap store", q3t_error(s));
    if (tp_world) declare_shards(s, &m.c);
    for (i = 0; i <= n_decode; i++) {
        const int64_t *ids = i == 0 ? prompt : &decode[i - 1];
        int T = i == 0 ? n_prompt : 1;
        for (t = 0; t < T; t++) positions[t] = m.len + t;
        if (q3t_begin_step(s, i, T, ids, positions)) die("tap store", q3t_error(s));
        step(&m, s, ids, positions, T);
        if (q3t_end_step(s)) die("tap store", q3t_error(s));
        if (i == crash_after) {
            fprintf(stderr, "example_engine: crashing after step %d as asked\n", i);
            _Exit(3);
        }
    }
    return q3t_close(s) ? 2 : 0;
}
