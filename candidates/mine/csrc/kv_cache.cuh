// The one canonical KV-cache offset. The cache of every layer is one buffer [L, B, nKV, S_max, D];
// a token at position p lives in slot p (positions of a sequence are 0, 1, 2, ... with no gaps).
#pragma once

#include <stddef.h>

#include "qwen3_math.cuh"

namespace qmath {

struct KVShape {  // of one layer's slice; the layers follow one another
  int batch, kv_heads, max_seq, head_dim;
};

// Element (layer, b, kv head h, slot s, dim d) of the cache buffer.
QD size_t kv_offset(const KVShape& c, int layer, int b, int h, int s, int d) {
  return ((((size_t)layer * c.batch + b) * c.kv_heads + h) * c.max_seq + s) * c.head_dim + d;
}

}  // namespace qmath
