/* qwen3dbg_taps.h — write a qwen3dbg tap store (format `qwen3dbg-taps/1`) from C, C++ or CUDA host code.

   One header, C99, no dependencies. In exactly one source file:

       #define QWEN3DBG_TAPS_IMPLEMENTATION
       #include "qwen3dbg_taps.h"

   A store is a directory holding manifest.json and one step_NNNN.safetensors per forward step
   (step 0 the prefill, each later step one decoded token). Use:

       q3t_store *s = q3t_open("out_dir", "my-engine", "float32", 1);   // dir must exist
       if (q3t_error(s)[0]) ...                // q3t_open reports through q3t_error
                                               // (e.g. another writer holds out_dir: the store
                                               // is locked from q3t_open to q3t_close)
       q3t_missing(s, "attn_scores");          // ops this engine cannot expose (optional)
       q3t_rank(s, 1, 2);                      // one rank of a tensor-parallel run (optional), then
       q3t_shard(s, "q_proj", Q3T_SPLIT, 2, 1024, 2048);   // per op or tap: how this rank holds it
       q3t_shard(s, "o_proj", Q3T_PARTIAL, 0, 0, 0);       // (undeclared taps are replicated)
       q3t_begin_step(s, 0, T, ids, positions);  // ids, positions: int64 [B*T], row-major [B][T]
       q3t_write(s, "layers.0.q_rope", Q3T_F32, 4, shape, ptr);   // host pointer, C-contiguous
       q3t_end_step(s);
       ...
       q3t_close(s);   // only now does the manifest say "complete": true

   Tap names, order and shapes are the schema of qwen3dbg/tapstore/schema.py (`qwen3dbg validate-store DIR
   --model MODEL` checks a store against it). Every other function returns 0 on success and -1 on
   error; q3t_error(s) says why, and after an error every later call fails too. If the program dies before q3t_close, the manifest on disk says
   "complete": false and qwen3dbg refuses to compare the store.
*/
#ifndef QWEN3DBG_TAPS_H
#define QWEN3DBG_TAPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { Q3T_F32, Q3T_F16, Q3T_BF16, Q3T_I32, Q3T_I64 } q3t_dtype;

typedef struct q3t_store q3t_store;

/* dtype: the compute dtype in torch's spelling ("float32", "bfloat16", "float16"); batch: B. */
q3t_store *q3t_open(const char *dir, const char *implementation, const char *dtype, int batch);
/* Declare an op of the schema (e.g. "attn_probs") this engine does not expose; before the first step. */
int q3t_missing(q3t_store *s, const char *name);
/* Add a top-level manifest field whose value is raw JSON text: "config" (the model's config.json),
   "notes" (a list of sentences shown with the report, e.g. "[\"attention in fp16\"]"). */
int q3t_manifest_field(q3t_store *s, const char *key, const char *json_value);
/* A store written by one rank of a tensor-parallel run: its rank (0 <= rank < world_size); before the first
   step. Each rank writes a store of its own; `qwen3dbg diff --cand store:DIR0,DIR1,...` gathers them. */
int q3t_rank(q3t_store *s, int rank, int world_size);
/* How this rank holds the taps of op `name` ("q_proj": every layer) or tap `name` ("layers.3.q_proj": that one,
   before its op's entry); a tap named by neither is replicated (every rank writes the same whole tap).
   Q3T_SPLIT: the slice [start, stop) of axis `axis` of the whole tap (column-parallel: heads or channels);
   Q3T_PARTIAL: a whole-shaped addend that the ranks' sum completes (row-parallel, before the all-reduce);
   Q3T_PARTIAL and Q3T_REPLICATED ignore axis, start and stop. After q3t_rank, before the first step. */
typedef enum { Q3T_REPLICATED = 0, Q3T_SPLIT = 1, Q3T_PARTIAL = 2 } q3t_layout;
int q3t_shard(q3t_store *s, const char *name, q3t_layout layout, int axis, int64_t start, int64_t stop);
int q3t_begin_step(q3t_store *s, int step, int tokens, const int64_t *token_ids, const int64_t *positions);
/* Within a step, before its taps: declare that the step's k_cache/v_cache hold only the slots at these
   logical positions, [B,nKV,n,D] (Q3T_CACHE_POSITIONS: at a decode step, the step's own positions), or
   that attn_scores/attn_probs hold only these query rows, [B,nH,n,S] (Q3T_ATTENTION_POSITIONS). Positions
   are logical (the S axis as a plain growing cache numbers it): ring and paged caches translate. */
typedef enum { Q3T_CACHE_POSITIONS = 0, Q3T_ATTENTION_POSITIONS = 1 } q3t_subset;
int q3t_step_positions(q3t_store *s, q3t_subset which, int n, const int64_t *positions);
int q3t_write(q3t_store *s, const char *name, q3t_dtype dtype, int ndim, const int64_t *shape, const void *data);
int q3t_end_step(q3t_store *s);
/* Mark the store complete and free it (also on error; the return value says which). */
int q3t_close(q3t_store *s);
/* Free without marking complete: what a crash leaves behind, minus the leak. */
void q3t_abandon(q3t_store *s);
const char *q3t_error(const q3t_store *s);

#ifdef __cplusplus
}
#endif
#endif /* QWEN3DBG_TAPS_H */

#ifdef QWEN3DBG_TAPS_IMPLEMENTATION
#ifndef QWEN3DBG_TAPS_IMPLEMENTED
#define QWEN3DBG_TAPS_IMPLEMENTED

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
/* flock on the directory itself, as qwen3dbg's own writer takes it: two writers never interleave */
#define Q3T__LOCK 1
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#endif

typedef struct { char *p; size_t len, cap; } q3t__buf;

typedef struct {
    char *name;
    q3t_dtype dtype;
    int ndim;
    int64_t shape[8];
    uint64_t begin, end;
} q3t__tensor;

struct q3t_store {
    char *dir;
    char error[4608]; /* room for a message and a 4096-byte path */
    q3t__buf head;    /* manifest fields before "steps" */
    q3t__buf steps;   /* the steps array's entries, comma-separated */
    q3t__buf missing; /* the missing_taps entries */
    q3t__buf shards;  /* the shards entries of a rank's store */
    int rank, world_size; /* world_size 0: not a rank's store */
    int batch, in_step, n_steps, step, tokens;
    int64_t *ids, *pos;
    int64_t *subset[2]; /* the step's declared cache slots and attention rows (q3t_step_positions) */
    int n_subset[2];
    FILE *data; /* the step's tensor bytes, spooled until end_step writes the header in front */
    q3t__tensor *tensors;
    int n_tensors, cap_tensors;
    uint64_t offset;
    int lock_fd; /* the directory, locked while the store is open; -1 when none */
};

static int q3t__fail(q3t_store *s, const char *what, const char *detail) {
    snprintf(s->error, sizeof s->error, "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
    return -1;
}

static int q3t__put(q3t__buf *b, const char *text, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        char *p;
        while (cap < b->len + n + 1) cap *= 2;
        p = (char *)realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, text, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static int q3t__puts(q3t__buf *b, const char *text) { return q3t__put(b, text, strlen(text)); }

static int q3t__putf(q3t__buf *b, const char *fmt, long long v) {
    char tmp[32];
    snprintf(tmp, sizeof tmp, fmt, v);
    return q3t__puts(b, tmp);
}

/* A JSON string literal: quotes, backslashes and control characters escaped. */
static int q3t__put_str(q3t__buf *b, const char *text) {
    const unsigned char *c;
    int rc = q3t__puts(b, "\"");
    for (c = (const unsigned char *)text; *c && !rc; c++) {
        if (*c == '"' || *c == '\\') {
            char esc[2];
            esc[0] = '\\';
            esc[1] = (char)*c;
            rc = q3t__put(b, esc, 2);
        } else if (*c < 0x20) {
            rc = q3t__putf(b, "\\u%04x", (long long)*c);
        } else {
            rc = q3t__put(b, (const char *)c, 1);
        }
    }
    return rc ? rc : q3t__puts(b, "\"");
}

static char *q3t__strdup(const char *text) {
    size_t n = strlen(text) + 1;
    char *p = (char *)malloc(n);
    if (p) memcpy(p, text, n);
    return p;
}

static void q3t__path(const q3t_store *s, char *out, size_t size, const char *file) {
    snprintf(out, size, "%s/%s", s->dir, file);
}

static void q3t__step_file(const q3t_store *s, char *out, size_t size, int step, const char *suffix) {
    char name[64];
    snprintf(name, sizeof name, "step_%04d.safetensors%s", step, suffix);
    q3t__path(s, out, size, name);
}

/* Write manifest.json through a temporary file and rename(), so readers never see half of it. */
static int q3t__write_manifest(q3t_store *s, int complete) {
    char path[4096], tmp[4096];
    FILE *f;
    int ok;
    q3t__path(s, path, sizeof path, "manifest.json");
    q3t__path(s, tmp, sizeof tmp, "manifest.json.tmp");
    f = fopen(tmp, "wb");
    if (!f) return q3t__fail(s, "cannot write the manifest (does the store directory exist?)", tmp);
    ok = fprintf(f, "{\n%s,\n \"complete\": %s,\n \"missing_taps\": [%s],\n", s->head.p, complete ? "true" : "false",
                 s->missing.p ? s->missing.p : "") > 0;
    if (s->world_size)
        ok = fprintf(f, " \"rank\": %d,\n \"world_size\": %d,\n \"shards\": {%s},\n", s->rank, s->world_size,
                     s->shards.p ? s->shards.p : "") > 0 && ok;
    ok = fprintf(f, " \"steps\": [%s%s%s]\n}\n", s->n_steps ? "\n  " : "", s->steps.p ? s->steps.p : "",
                 s->n_steps ? "\n " : "") > 0 && ok;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) return q3t__fail(s, "cannot replace the manifest", path);
    return 0;
}

static int q3t__valid_dtype(const char *dtype) {
    return !strcmp(dtype, "float32") || !strcmp(dtype, "bfloat16") || !strcmp(dtype, "float16") ||
           !strcmp(dtype, "float64");
}

q3t_store *q3t_open(const char *dir, const char *implementation, const char *dtype, int batch) {
    q3t_store *s = (q3t_store *)calloc(1, sizeof(q3t_store));
    if (!s) return NULL;
    s->lock_fd = -1;
    s->dir = q3t__strdup(dir);
    s->batch = batch;
    if (!s->dir) {
        free(s);
        return NULL;
    }
    if (!q3t__valid_dtype(dtype) || batch < 1) {
        q3t__fail(s, "q3t_open: dtype must be float32, bfloat16, float16 or float64 and batch at least 1", dtype);
        return s;
    }
#ifdef Q3T__LOCK
    s->lock_fd = open(dir, O_RDONLY);
    if (s->lock_fd < 0) {
        q3t__fail(s, "q3t_open: cannot open the directory (it must exist)", dir);
        return s;
    }
    if (flock(s->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        q3t__fail(s, "q3t_open: another writer is writing a tap store into", dir);
        return s;
    }
#endif
    if (q3t__puts(&s->head, " \"format\": \"qwen3dbg-taps/1\",\n \"implementation\": ") ||
        q3t__put_str(&s->head, implementation) || q3t__puts(&s->head, ",\n \"dtype\": ") ||
        q3t__put_str(&s->head, dtype) || q3t__putf(&s->head, ",\n \"batch\": %lld", (long long)batch)) {
        q3t__fail(s, "out of memory", NULL);
        return s;
    }
    q3t__write_manifest(s, 0);
    return s;
}

const char *q3t_error(const q3t_store *s) { return s ? s->error : "q3t_open: out of memory"; }

int q3t_missing(q3t_store *s, const char *name) {
    if (s->error[0]) return -1;
    if (s->n_steps || s->in_step) return q3t__fail(s, "q3t_missing: declare missing taps before the first step", name);
    if ((s->missing.len && q3t__puts(&s->missing, ", ")) || q3t__put_str(&s->missing, name))
        return q3t__fail(s, "out of memory", NULL);
    return q3t__write_manifest(s, 0);
}

int q3t_rank(q3t_store *s, int rank, int world_size) {
    if (s->error[0]) return -1;
    if (s->n_steps || s->in_step) return q3t__fail(s, "q3t_rank: declare the rank before the first step", NULL);
    if (world_size < 1 || rank < 0 || rank >= world_size)
        return q3t__fail(s, "q3t_rank: the rank must satisfy 0 <= rank < world_size", NULL);
    s->rank = rank;
    s->world_size = world_size;
    return q3t__write_manifest(s, 0);
}

int q3t_shard(q3t_store *s, const char *name, q3t_layout layout, int axis, int64_t start, int64_t stop) {
    int rc;
    if (s->error[0]) return -1;
    if (!s->world_size) return q3t__fail(s, "q3t_shard: call q3t_rank first", name);
    if (s->n_steps || s->in_step) return q3t__fail(s, "q3t_shard: declare layouts before the first step", name);
    if (layout == Q3T_SPLIT && (axis < 0 || start < 0 || stop <= start))
        return q3t__fail(s, "q3t_shard: a split needs an axis >= 0 and 0 <= start < stop", name);
    if (layout != Q3T_SPLIT && layout != Q3T_PARTIAL && layout != Q3T_REPLICATED)
        return q3t__fail(s, "q3t_shard: the layout is Q3T_SPLIT, Q3T_PARTIAL or Q3T_REPLICATED", name);
    rc = (s->shards.len && q3t__puts(&s->shards, ", ")) || q3t__put_str(&s->shards, name) || q3t__puts(&s->shards, ": ");
    if (layout == Q3T_SPLIT)
        rc = rc || q3t__putf(&s->shards, "{\"axis\": %lld", (long long)axis) ||
             q3t__putf(&s->shards, ", \"start\": %lld", (long long)start) ||
             q3t__putf(&s->shards, ", \"stop\": %lld}", (long long)stop);
    else
        rc = rc || q3t__puts(&s->shards, layout == Q3T_PARTIAL ? "\"partial\"" : "\"replicated\"");
    if (rc) return q3t__fail(s, "out of memory", NULL);
    return q3t__write_manifest(s, 0);
}

int q3t_manifest_field(q3t_store *s, const char *key, const char *json_value) {
    if (s->error[0]) return -1;
    if (q3t__puts(&s->head, ",\n ") || q3t__put_str(&s->head, key) || q3t__puts(&s->head, ": ") ||
        q3t__puts(&s->head, json_value))
        return q3t__fail(s, "out of memory", NULL);
    return q3t__write_manifest(s, 0);
}

int q3t_begin_step(q3t_store *s, int step, int tokens, const int64_t *token_ids, const int64_t *positions) {
    char path[4096];
    size_t n = (size_t)s->batch * (size_t)(tokens > 0 ? tokens : 0);
    if (s->error[0]) return -1;
    if (s->in_step) return q3t__fail(s, "q3t_begin_step: q3t_end_step the previous step first", NULL);
    if (step != s->n_steps) return q3t__fail(s, "q3t_begin_step: steps are numbered 0, 1, 2, ... without gaps", NULL);
    if (tokens < 1) return q3t__fail(s, "q3t_begin_step: a step has at least one token", NULL);
    free(s->ids);
    free(s->pos);
    s->ids = (int64_t *)malloc(n * sizeof(int64_t));
    s->pos = (int64_t *)malloc(n * sizeof(int64_t));
    if (!s->ids || !s->pos) return q3t__fail(s, "out of memory", NULL);
    memcpy(s->ids, token_ids, n * sizeof(int64_t));
    memcpy(s->pos, positions, n * sizeof(int64_t));
    q3t__step_file(s, path, sizeof path, step, ".data");
    s->data = fopen(path, "w+b");
    if (!s->data) return q3t__fail(s, "cannot create the step's data file", path);
    s->step = step;
    s->tokens = tokens;
    s->in_step = 1;
    s->n_subset[0] = s->n_subset[1] = 0;
    s->n_tensors = 0;
    s->offset = 0;
    return 0;
}

int q3t_step_positions(q3t_store *s, q3t_subset which, int n, const int64_t *positions) {
    int64_t *copy;
    if (s->error[0]) return -1;
    if (!s->in_step) return q3t__fail(s, "q3t_step_positions: call it between q3t_begin_step and q3t_end_step", NULL);
    if ((which != Q3T_CACHE_POSITIONS && which != Q3T_ATTENTION_POSITIONS) || n < 1)
        return q3t__fail(s, "q3t_step_positions: name the cache or the attention, and at least one position", NULL);
    copy = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    if (!copy) return q3t__fail(s, "out of memory", NULL);
    memcpy(copy, positions, (size_t)n * sizeof(int64_t));
    free(s->subset[which]);
    s->subset[which] = copy;
    s->n_subset[which] = n;
    return 0;
}

static const char *q3t__st_dtype(q3t_dtype d) {
    static const char *names[] = {"F32", "F16", "BF16", "I32", "I64"};
    return names[d];
}

static size_t q3t__itemsize(q3t_dtype d) {
    static const size_t sizes[] = {4, 2, 2, 4, 8};
    return sizes[d];
}

int q3t_write(q3t_store *s, const char *name, q3t_dtype dtype, int ndim, const int64_t *shape, const void *data) {
    q3t__tensor *t;
    uint64_t bytes;
    int i;
    if (s->error[0]) return -1;
    if (!s->in_step) return q3t__fail(s, "q3t_write: call q3t_begin_step first", name);
    if ((int)dtype < 0 || dtype > Q3T_I64 || ndim < 0 || ndim > 8)
        return q3t__fail(s, "q3t_write: bad dtype or more than 8 dimensions", name);
    for (i = 0; i < s->n_tensors; i++)
        if (!strcmp(s->tensors[i].name, name)) return q3t__fail(s, "q3t_write: tap written twice in one step", name);
    if (s->n_tensors == s->cap_tensors) {
        int cap = s->cap_tensors ? 2 * s->cap_tensors : 64;
        q3t__tensor *p = (q3t__tensor *)realloc(s->tensors, (size_t)cap * sizeof(q3t__tensor));
        if (!p) return q3t__fail(s, "out of memory", NULL);
        s->tensors = p;
        s->cap_tensors = cap;
    }
    t = &s->tensors[s->n_tensors];
    t->name = q3t__strdup(name);
    if (!t->name) return q3t__fail(s, "out of memory", NULL);
    s->n_tensors++;
    t->dtype = dtype;
    t->ndim = ndim;
    bytes = q3t__itemsize(dtype);
    for (i = 0; i < ndim; i++) {
        if (shape[i] < 0) return q3t__fail(s, "q3t_write: negative dimension", name);
        t->shape[i] = shape[i];
        bytes *= (uint64_t)shape[i];
    }
    t->begin = s->offset;
    t->end = s->offset + bytes;
    if (bytes && fwrite(data, 1, (size_t)bytes, s->data) != (size_t)bytes)
        return q3t__fail(s, "q3t_write: short write (disk full?)", name);
    s->offset = t->end;
    return 0;
}

static int q3t__append_step_entry(q3t_store *s) {
    q3t__buf *b = &s->steps;
    int pass, r, t, rc = 0;
    if (s->n_steps) rc |= q3t__puts(b, ",\n  ");
    rc |= q3t__putf(b, "{\"step\": %lld", (long long)s->step);
    for (pass = 0; pass < 2; pass++) {
        const int64_t *v = pass ? s->pos : s->ids;
        rc |= q3t__puts(b, pass ? ", \"positions\": [" : ", \"token_ids\": [");
        for (r = 0; r < s->batch; r++) {
            rc |= q3t__puts(b, r ? ", [" : "[");
            for (t = 0; t < s->tokens; t++) rc |= q3t__putf(b, t ? ", %lld" : "%lld", (long long)v[r * s->tokens + t]);
            rc |= q3t__puts(b, "]");
        }
        rc |= q3t__puts(b, "]");
    }
    for (pass = 0; pass < 2; pass++) {
        if (!s->n_subset[pass]) continue;
        rc |= q3t__puts(b, pass ? ", \"attention_positions\": [" : ", \"cache_positions\": [");
        for (t = 0; t < s->n_subset[pass]; t++) rc |= q3t__putf(b, t ? ", %lld" : "%lld", (long long)s->subset[pass][t]);
        rc |= q3t__puts(b, "]");
    }
    return rc | q3t__puts(b, "}");
}

/* The safetensors header (JSON, padded with spaces so the data starts 8-byte aligned), then the data. */
int q3t_end_step(q3t_store *s) {
    char path[4096], spool[4096], chunk[1 << 16];
    q3t__buf h = {NULL, 0, 0};
    unsigned char len8[8];
    uint64_t hlen;
    size_t got;
    FILE *f;
    int i, d, rc = 0;
    if (s->error[0]) return -1;
    if (!s->in_step) return q3t__fail(s, "q3t_end_step: no step is open", NULL);
    rc |= q3t__puts(&h, "{");
    for (i = 0; i < s->n_tensors; i++) {
        q3t__tensor *t = &s->tensors[i];
        rc |= q3t__put_str(&h, t->name);
        rc |= q3t__puts(&h, ":{\"dtype\":\"");
        rc |= q3t__puts(&h, q3t__st_dtype(t->dtype));
        rc |= q3t__puts(&h, "\",\"shape\":[");
        for (d = 0; d < t->ndim; d++) rc |= q3t__putf(&h, d ? ",%lld" : "%lld", (long long)t->shape[d]);
        rc |= q3t__putf(&h, "],\"data_offsets\":[%lld,", (long long)t->begin);
        rc |= q3t__putf(&h, "%lld]},", (long long)t->end);
    }
    rc |= q3t__puts(&h, "\"__metadata__\":{\"format\":\"pt\"}}");
    while (!rc && (8 + h.len) % 8) rc |= q3t__puts(&h, " ");
    if (rc) {
        free(h.p);
        return q3t__fail(s, "out of memory", NULL);
    }
    hlen = h.len;
    for (i = 0; i < 8; i++) len8[i] = (unsigned char)(hlen >> (8 * i));
    q3t__step_file(s, path, sizeof path, s->step, "");
    q3t__step_file(s, spool, sizeof spool, s->step, ".data");
    f = fopen(path, "wb");
    if (!f) {
        free(h.p);
        return q3t__fail(s, "cannot create the step file", path);
    }
    rc = fwrite(len8, 1, 8, f) != 8 || fwrite(h.p, 1, h.len, f) != h.len;
    free(h.p);
    rewind(s->data);
    while (!rc && (got = fread(chunk, 1, sizeof chunk, s->data)) > 0) rc = fwrite(chunk, 1, got, f) != got;
    rc |= fclose(f) != 0;
    fclose(s->data);
    s->data = NULL;
    remove(spool);
    for (i = 0; i < s->n_tensors; i++) free(s->tensors[i].name);
    s->n_tensors = 0;
    s->in_step = 0;
    if (rc) return q3t__fail(s, "short write of the step file (disk full?)", path);
    if (q3t__append_step_entry(s)) return q3t__fail(s, "out of memory", NULL);
    s->n_steps++;
    return q3t__write_manifest(s, 0);
}

static void q3t__free(q3t_store *s) {
    int i;
    if (s->data) fclose(s->data);
#ifdef Q3T__LOCK
    if (s->lock_fd >= 0) close(s->lock_fd);
#endif
    for (i = 0; i < s->n_tensors; i++) free(s->tensors[i].name);
    free(s->tensors);
    free(s->ids);
    free(s->pos);
    free(s->subset[0]);
    free(s->subset[1]);
    free(s->head.p);
    free(s->steps.p);
    free(s->missing.p);
    free(s->shards.p);
    free(s->dir);
    free(s);
}

int q3t_close(q3t_store *s) {
    int rc;
    if (!s) return -1;
    rc = s->error[0] ? -1 : s->in_step ? q3t__fail(s, "q3t_close: a step is still open", NULL) : q3t__write_manifest(s, 1);
    if (rc) fprintf(stderr, "qwen3dbg_taps: %s\n", s->error);
    q3t__free(s);
    return rc;
}

void q3t_abandon(q3t_store *s) {
    if (s) q3t__free(s);
}

#endif /* QWEN3DBG_TAPS_IMPLEMENTED */
#endif /* QWEN3DBG_TAPS_IMPLEMENTATION */
