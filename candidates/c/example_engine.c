/* example_engine.c — a plain-C float32 Qwen3 (dense) with a KV cache that writes every tap through
   qwen3dbg_taps.h: the worked example of instrumenting a C engine for `qwen3dbg diff --cand store:DIR`.

   Reads config.json and a single model.safetensors (F32, BF16 or F16) with a minimal JSON scan that
   is enough for Hugging Face-style files. Batch 1; the prompt is prefilled as step 0 and each forced
   decode id is one more step.

   Build:  cc -std=c99 -O2 -Wall -o example_engine example_engine.c -lm
           (add -DPLANT_ROPE_BUG to plant a wrong RoPE theta, 10000 instead of the config's)
   Run:    example_engine MODEL_DIR OUT_DIR 9,41,7,300 [--decode 5,17] [--crash-after STEP] [--no-attention-matrices 1]
   --crash-after exits abruptly after that step, leaving a store whose manifest says incomplete;
   --no-attention-matrices declares attn_scores and attn_probs missing instead of writing them.
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

static void tap(q3t_store *s, const char *name, int layer, int ndim, const int64_t *shape, const float *data) {
    char full[128];
    if (layer >= 0)
        snprintf(full, sizeof full, "layers.%d.%s", layer, name);
    else
        snprintf(full, sizeof full, "%s", name);
    if (q3t_write(s, full, Q3T_F32, ndim, shape, data)) die("tap store", q3t_error(s));
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
    float *logits = (float *)malloc(sizeof(float) * T * V);
    int64_t sh_h[3] = {1, T, H}, sh_q[3] = {1, T, Q}, sh_kv[3] = {1, T, KV}, sh_i[3] = {1, T, I};
    int64_t sh_qh[4] = {1, T, nH, D}, sh_kh[4] = {1, T, nKV, D}, sh_c[4] = {1, nKV, m->len ? T : S, D};
    size_t first = m->len ? (size_t)m->len : 0; /* the first cache slot the step's cache taps hold */
    if (m->len && q3t_step_positions(s, Q3T_CACHE_POSITIONS, T, pos)) die("tap store", q3t_error(s));
    int64_t sh_s[4] = {1, nH, T, S}, sh_v[3] = {1, T, V};
#ifdef PLANT_ROPE_BUG
    theta = 10000.0f; /* the planted bug: Llama's theta instead of Qwen3's */
#endif
    if (S > m->max_seq) die("the KV cache is full", NULL);

    for (t = 0; t < T; t++) memcpy(x + (size_t)t * H, m->embed + (size_t)ids[t] * H, sizeof(float) * H);
    tap(s, "embed", -1, 3, sh_h, x);
    for (i = 0; i < c->layers; i++) {
        Layer *L = &m->layer[i];
        rms_norm(hn, x, L->attn_norm, T, H, c->eps);
        tap(s, "attn_norm", i, 3, sh_h, hn);
        linear(q, hn, L->q, T, H, Q);
        linear(k, hn, L->k, T, H, KV);
        linear(v, hn, L->v, T, H, KV);
        tap(s, "q_proj", i, 3, sh_q, q);
        tap(s, "k_proj", i, 3, sh_kv, k);
        tap(s, "v_proj", i, 3, sh_kv, v);
        rms_norm(q, q, L->q_norm, T * nH, D, c->eps);
        rms_norm(k, k, L->k_norm, T * nKV, D, c->eps);
        tap(s, "q_norm", i, 4, sh_qh, q);
        tap(s, "k_norm", i, 4, sh_kh, k);
        rope(q, pos, T, nH, D, theta);
        rope(k, pos, T, nKV, D, theta);
        tap(s, "q_rope", i, 4, sh_qh, q);
        tap(s, "k_rope", i, 4, sh_kh, k);
        for (t = 0; t < T; t++)
            for (h = 0; h < nKV; h++) {
                size_t slot = ((size_t)h * m->max_seq + m->len + t) * D, src = ((size_t)t * nKV + h) * D;
                memcpy(L->k_cache + slot, k + src, sizeof(float) * D);
                memcpy(L->v_cache + slot, v + src, sizeof(float) * D);
            }
        /* The prefill writes its whole cache; a decode step only the slots it filled (declared below). */
        for (h = 0; h < nKV; h++)
            memcpy(cache + (size_t)h * sh_c[2] * D, L->k_cache + ((size_t)h * m->max_seq + first) * D, sizeof(float) * sh_c[2] * D);
        tap(s, "k_cache", i, 4, sh_c, cache);
        for (h = 0; h < nKV; h++)
            memcpy(cache + (size_t)h * sh_c[2] * D, L->v_cache + ((size_t)h * m->max_seq + first) * D, sizeof(float) * sh_c[2] * D);
        tap(s, "v_cache", i, 4, sh_c, cache);
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
            tap(s, "attn_scores", i, 4, sh_s, sc);
            tap(s, "attn_probs", i, 4, sh_s, pr);
        }
        tap(s, "attn_out", i, 3, sh_q, att);
        linear(o, att, L->o, T, Q, H);
        tap(s, "o_proj", i, 3, sh_h, o);
        for (j = 0; j < T * H; j++) x[j] += o[j];
        tap(s, "resid_mid", i, 3, sh_h, x);
        rms_norm(hn, x, L->mlp_norm, T, H, c->eps);
        tap(s, "mlp_norm", i, 3, sh_h, hn);
        linear(g, hn, L->gate, T, H, I);
        linear(u, hn, L->up, T, H, I);
        for (j = 0; j < T * I; j++) a[j] = silu(g[j]) * u[j];
        tap(s, "mlp.gate", i, 3, sh_i, g);
        tap(s, "mlp.up", i, 3, sh_i, u);
        tap(s, "mlp.act", i, 3, sh_i, a);
        linear(o, a, L->down, T, I, H);
        tap(s, "mlp.out", i, 3, sh_h, o);
        for (j = 0; j < T * H; j++) x[j] += o[j];
        tap(s, "resid_out", i, 3, sh_h, x);
    }
    rms_norm(hn, x, m->final_norm, T, H, c->eps);
    tap(s, "final_norm", -1, 3, sh_h, hn);
    linear(logits, hn, m->lm_head, T, H, V);
    tap(s, "logits", -1, 3, sh_v, logits);
    m->len = S;
    free(x), free(hn), free(q), free(k), free(v), free(att), free(o), free(g), free(u), free(a);
    free(sc), free(pr), free(cache), free(logits);
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
