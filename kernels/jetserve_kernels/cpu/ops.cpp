// CPU kernels for the engine's hot path: paged attention read block by block from the
// cache (no gathered copy of K/V), the KV-cache write, and the fused RMSNorm and rotary
// that would otherwise be a dozen small torch ops each. Built at first use by
// kernels/jetserve_kernels/cpu/build.py; kernels/jetserve_kernels/cpu/ops.py wraps them and says what each returns.
//
// Everything accumulates in fp32 whatever the storage dtype (fp32, bf16, fp16), and
// loops over the head dimension are written so the compiler vectorises them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16_vec.h"
#include "cache_types.h"
#include "rotary_head.h"
#include "vec_exp.h"

namespace {

constexpr float kNegLarge = -1.0e30f;  // a finite "minus infinity": safe under vectorisation

// exp for x <= 0 (softmax arguments after the max is taken out), branch-free so the
// compiler vectorises a loop of it: 2^(x log2 e) split into integer and fraction, the
// fraction through a degree-6 minimax polynomial (relative error under 2e-7).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.4426950408889634f;
  const float fi = std::floor(t);
  const float f = t - fi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(fi) * (1 << 23);
  std::memcpy(&p, &bits, sizeof(bits));
  return p;
}

template <typename T>
inline float as_float(T v) {
  return static_cast<float>(v);
}

// Scores of every query row against one cached key, four rows per pass so each key
// element is loaded once for four dot products (GQA rows share their kv head's keys).
template <typename T>
inline void scores_of_position(const float* qf, const T* k, float* out, int64_t rows, int64_t D,
                               int64_t stride) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float *q0 = qf + r * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
    float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int64_t d = 0; d < D; ++d) {
      const float kd = as_float(k[d]);
      d0 += q0[d] * kd;
      d1 += q1[d] * kd;
      d2 += q2[d] * kd;
      d3 += q3[d] * kd;
    }
    out[r * stride] = d0;
    out[(r + 1) * stride] = d1;
    out[(r + 2) * stride] = d2;
    out[(r + 3) * stride] = d3;
  }
  for (; r < rows; ++r) {
    const float* q0 = qf + r * D;
    float d0 = 0.0f;
#pragma omp simd reduction(+ : d0)
    for (int64_t d = 0; d < D; ++d) d0 += q0[d] * as_float(k[d]);
    out[r * stride] = d0;
  }
}

// acc[r] += p[r] * v for every row, four rows per pass over the value row.
template <typename T>
inline void accumulate_position(const float* p, const T* v, float* acc, int64_t rows, int64_t D,
                                int64_t stride) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float p0 = p[r * stride], p1 = p[(r + 1) * stride], p2 = p[(r + 2) * stride],
                p3 = p[(r + 3) * stride];
    float *a0 = acc + r * D, *a1 = a0 + D, *a2 = a1 + D, *a3 = a2 + D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const float vd = as_float(v[d]);
      a0[d] += p0 * vd;
      a1[d] += p1 * vd;
      a2[d] += p2 * vd;
      a3[d] += p3 * vd;
    }
  }
  for (; r < rows; ++r) {
    const float p0 = p[r * stride];
    float* a0 = acc + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) a0[d] += p0 * as_float(v[d]);
  }
}

// One work item: the query rows of `num_tokens` consecutive tokens of one sequence times
// the `group` query heads that share one kv head. K/V of each context block are read in
// place through the block table; an online softmax carries the running max and sum. T is
// the query's and output's dtype, C the cache's (cache_types.h).
template <typename T, typename C>
struct AttentionItem {
  const T* q;
  int64_t q_stride_t, q_stride_h;
  const C* k_cache;
  const C* v_cache;
  int64_t c_stride_b, c_stride_s, c_stride_h;
  const int32_t* block_table;
  T* out;
  int64_t o_stride_t, o_stride_h;
  int64_t head_dim, block_size, group;
  float scale;
};

// An item's `rows` query rows (num_tokens x group, token-major) as fp32 times the scale,
// with their accumulators zeroed and their running max and sum reset.
template <typename T, typename C>
inline void start_rows(const AttentionItem<T, C>& a, int64_t kv_head, int64_t first_token,
                       int64_t rows, int64_t D, float* qf, float* acc, float* m, float* l) {
  const int64_t G = a.group;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = first_token + r / G, h = kv_head * G + r % G;
    const T* src = a.q + t * a.q_stride_t + h * a.q_stride_h;
    float* dst = qf + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = as_float(src[d]) * a.scale;
    std::fill(acc + r * D, acc + (r + 1) * D, 0.0f);
    m[r] = kNegLarge;
    l[r] = 0.0f;
  }
}

// Each row's accumulator over its softmax sum, into the output in its dtype.
template <typename T, typename C>
inline void finish_rows(const AttentionItem<T, C>& a, int64_t kv_head, int64_t first_token,
                        int64_t rows, int64_t D, const float* acc, const float* l) {
  const int64_t G = a.group;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = first_token + r / G, h = kv_head * G + r % G;
    T* dst = a.out + t * a.o_stride_t + h * a.o_stride_h;
    const float inv = 1.0f / l[r];
    const float* ar = acc + r * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(ar[d] * inv);
  }
}

template <typename T, typename C>
void attend(const AttentionItem<T, C>& a, int64_t kv_head, int64_t first_token, int64_t num_tokens,
            int64_t context_len, int64_t seq_len, std::vector<float>& scratch) {
  const int64_t D = a.head_dim, G = a.group, rows = num_tokens * G, bs = a.block_size;
  scratch.resize(static_cast<size_t>(rows * (2 * D + 2 + bs)));
  float* qf = scratch.data();
  float* acc = qf + rows * D;
  float* m = acc + rows * D;
  float* l = m + rows;
  float* p = l + rows;  // [rows, block_size]: scores, then probabilities, of one block
  start_rows(a, kv_head, first_token, rows, D, qf, acc, m, l);
  // The last token of the item sees positions up to context_len + its index.
  const int64_t reach = std::min(seq_len, context_len + first_token + num_tokens);
  for (int64_t start = 0; start < reach; start += bs) {
    const int64_t block = a.block_table[start / bs];
    const C* kb = a.k_cache + block * a.c_stride_b + kv_head * a.c_stride_h;
    const C* vb = a.v_cache + block * a.c_stride_b + kv_head * a.c_stride_h;
    const int64_t in_block = std::min(bs, reach - start);
    for (int64_t j = 0; j < in_block; ++j) scores_of_position(qf, kb + j * a.c_stride_s, p + j, rows, D, bs);
    for (int64_t r = 0; r < rows; ++r) {
      float* pr = p + r * bs;
      const int64_t visible = context_len + first_token + r / G + 1 - start;
      const int64_t n = std::max<int64_t>(std::min(in_block, visible), 0);
      float block_max = kNegLarge;
      for (int64_t j = 0; j < n; ++j) block_max = std::max(block_max, pr[j]);
      const float m_new = std::max(m[r], block_max);
      const float alpha = exp_nonpositive(m[r] - m_new);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        pr[j] = exp_nonpositive(pr[j] - m_new);
        sum += pr[j];
      }
      for (int64_t j = n; j < in_block; ++j) pr[j] = 0.0f;  // future positions
      float* ar = acc + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
    }
    for (int64_t j = 0; j < in_block; ++j) accumulate_position(p + j, vb + j * a.c_stride_s, acc, rows, D, bs);
  }
  finish_rows(a, kv_head, first_token, rows, D, acc, l);
}

#if defined(__AVX512F__)
// The fp32-query path on AVX-512 (what -march=native gives on current x86 servers), over an
// fp32, bf16 or fp16 cache, each element widened to fp32 as it is loaded: the generic
// loops above spend most of their time on one horizontal sum per (row, position) and on
// accumulator rows that go through memory for every position. Here a group of 16
// positions is scored with one transposed reduction (16 dot-product vectors -> one vector
// of 16 scores, 45 instructions instead of 16 reductions), softmax runs on that vector,
// and the value rows are added into register-held accumulators, RB rows at a time, so
// each V row is loaded once per RB rows.

// Lane i of the result is the sum of v[i]'s 16 lanes.
inline __m512 lane_sums16(const __m512* v) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; ++k)
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                         _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k)
    u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0xEE));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44),
                                  _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44),
                                  _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// 16 cache elements as fp32: a bf16 cache widens on the load (a shift), an fp16 one with
// vcvtph2ps, so either reads half the bytes for the same arithmetic.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) { return jsk::widen_bf16(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Scores of one row against positions [0, n) of a group (n <= 16), as one vector; lanes
// from n on are kNegLarge.
template <int DV, typename C>
inline __m512 group_scores(const float* q, const C* k, int64_t k_stride, int64_t n) {
  __m512 qv[DV];
  for (int v = 0; v < DV; ++v) qv[v] = _mm512_loadu_ps(q + 16 * v);
  __m512 dots[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i < n) {
      const C* kr = k + i * k_stride;
      __m512 a = _mm512_mul_ps(qv[0], load16(kr));
      __m512 b = DV > 1 ? _mm512_mul_ps(qv[1], load16(kr + 16)) : _mm512_setzero_ps();
      for (int v = 2; v + 1 < DV; v += 2) {
        a = _mm512_fmadd_ps(qv[v], load16(kr + 16 * v), a);
        b = _mm512_fmadd_ps(qv[v + 1], load16(kr + 16 * v + 16), b);
      }
      if (DV > 2 && DV % 2) a = _mm512_fmadd_ps(qv[DV - 1], load16(kr + 16 * (DV - 1)), a);
      dots[i] = _mm512_add_ps(a, b);
    } else {
      dots[i] = _mm512_setzero_ps();
    }
  }
  const __mmask16 live = static_cast<__mmask16>((1u << n) - 1u);
  return _mm512_mask_blend_ps(live, _mm512_set1_ps(kNegLarge), lane_sums16(dots));
}

// RB accumulator rows of DV vectors, held in registers while values are added into them.
template <int DV, int RB>
struct RowAccumulators {
  __m512 a[RB][DV];

  // acc[r] * alpha[r], rows D floats apart.
  inline void load(const float* acc, int64_t D, const float* alpha) {
    for (int r = 0; r < RB; ++r) {
      const __m512 s = _mm512_set1_ps(alpha[r]);
      for (int d = 0; d < DV; ++d) a[r][d] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + 16 * d), s);
    }
  }

  inline void store(float* acc, int64_t D) const {
    for (int r = 0; r < RB; ++r)
      for (int d = 0; d < DV; ++d) _mm512_storeu_ps(acc + r * D + 16 * d, a[r][d]);
  }

  // a[r] += sum_i p[r * p_stride + i] * v_i over n value rows `v_stride` apart: each row
  // is loaded once for all RB accumulator rows.
  template <typename C>
  inline void add(const float* p, int64_t p_stride, const C* v, int64_t v_stride, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const C* vr = v + i * v_stride;
      __m512 vv[DV];
      for (int d = 0; d < DV; ++d) vv[d] = load16(vr + 16 * d);
      for (int r = 0; r < RB; ++r) {
        const __m512 pr = _mm512_set1_ps(p[r * p_stride + i]);
        for (int d = 0; d < DV; ++d) a[r][d] = _mm512_fmadd_ps(pr, vv[d], a[r][d]);
      }
    }
  }
};

// acc[r] = acc[r] * alpha[r] + sum_i p[r][i] * v_i over RB rows and the group's n
// positions; acc rows live in registers for the whole group.
template <int DV, int RB, typename C>
inline void group_values(float* acc, int64_t D, const float* p, const float* alpha,
                         const C* v, int64_t v_stride, int64_t n) {
  RowAccumulators<DV, RB> rows;
  rows.load(acc, D, alpha);
  rows.add(p, 16, v, v_stride, n);
  rows.store(acc, D);
}

template <int DV, typename C>
void attend_avx512(const AttentionItem<float, C>& a, int64_t kv_head, int64_t first_token,
                   int64_t num_tokens, int64_t context_len, int64_t seq_len,
                   std::vector<float>& scratch) {
  constexpr int64_t D = 16 * DV;
  constexpr int RB = DV <= 4 ? 4 : 2;  // RB * DV accumulators: 16 registers
  const int64_t G = a.group, rows = num_tokens * G, bs = a.block_size;
  scratch.resize(static_cast<size_t>(rows * (2 * D + 3 + 16)));
  float* qf = scratch.data();
  float* acc = qf + rows * D;
  float* m = acc + rows * D;
  float* l = m + rows;
  float* alpha = l + rows;
  float* p = alpha + rows;  // [rows, 16]: one group's probabilities
  start_rows(a, kv_head, first_token, rows, D, qf, acc, m, l);
  const int64_t reach = std::min(seq_len, context_len + first_token + num_tokens);
  for (int64_t start = 0; start < reach; start += bs) {
    const int64_t block = a.block_table[start / bs];
    const C* kb = a.k_cache + block * a.c_stride_b + kv_head * a.c_stride_h;
    const C* vb = a.v_cache + block * a.c_stride_b + kv_head * a.c_stride_h;
    const int64_t in_block = std::min(bs, reach - start);
    for (int64_t g = 0; g < in_block; g += 16) {
      const int64_t n = std::min<int64_t>(16, in_block - g);
      const C* kg = kb + g * a.c_stride_s;
      int64_t live_rows = 0;  // rows are in token order: those that see this group come first
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t visible = context_len + first_token + r / G + 1 - (start + g);
        const int64_t seen = std::max<int64_t>(std::min(n, visible), 0);
        if (seen == 0) {
          alpha[r] = 1.0f;
          std::fill(p + r * 16, p + r * 16 + 16, 0.0f);
          continue;
        }
        live_rows = r + 1;
        const __m512 sc = group_scores<DV>(qf + r * D, kg, a.c_stride_s, seen);
        const float m_new = std::max(m[r], _mm512_reduce_max_ps(sc));
        const __mmask16 live = static_cast<__mmask16>((1u << seen) - 1u);
        const __m512 pv =
            _mm512_maskz_mov_ps(live, jsk::exp16(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
        alpha[r] = exp_nonpositive(m[r] - m_new);
        l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(pv);
        m[r] = m_new;
        _mm512_storeu_ps(p + r * 16, pv);
      }
      const C* vg = vb + g * a.c_stride_s;
      int64_t r = 0;
      for (; r + RB <= live_rows; r += RB)
        group_values<DV, RB, C>(acc + r * D, D, p + r * 16, alpha + r, vg, a.c_stride_s, n);
      for (; r < live_rows; ++r)
        group_values<DV, 1, C>(acc + r * D, D, p + r * 16, alpha + r, vg, a.c_stride_s, n);
    }
  }
  finish_rows(a, kv_head, first_token, rows, D, acc, l);
}

// A decode item (one query token: its G rows, the query heads over this KV head, all see
// the whole context) takes the context a chunk of whole blocks at a time, in three passes:
// every score of the chunk (a running vector max, no horizontal reduction per group), one
// softmax per row over the chunk (one horizontal max and sum, one rescale of the
// accumulators), then the values with the accumulators in registers across the chunk.
// What bounds it is memory, not arithmetic: a block sits anywhere in the cache, and one
// head's rows of consecutive positions lie other heads' bytes apart, so the hardware
// prefetcher cannot run ahead. The score pass asks for the next block's keys and this
// block's values (into L2) itself. A chunk holds about kDecodeChunkBytes of values, which
// the value pass reads once per RB rows: after the first, from L1.
// 8, 16 and 32 KiB measured alike at 64-dim heads; 16 was the best at 128 in fp32.
constexpr int64_t kDecodeChunkBytes = 16 * 1024;

// Asks for n rows of `bytes` each, `stride` elements apart, a cache line at a time, into
// L1 (ToL1) or L2.
template <bool ToL1, typename C>
inline void prefetch_rows(const C* p, int64_t stride, int64_t n, int64_t bytes) {
  for (int64_t i = 0; i < n; ++i) {
    const char* row = reinterpret_cast<const char*>(p + i * stride);
    for (int64_t off = 0; off < bytes; off += 64) {
      if constexpr (ToL1)
        _mm_prefetch(row + off, _MM_HINT_T0);
      else
        _mm_prefetch(row + off, _MM_HINT_T1);
    }
  }
}

// acc[r] = acc[r] * alpha[r] + sum_i p[r][i] * v_i for RB rows over the chunk's cn positions
// from c0, read through the block table; acc rows live in registers for the whole chunk.
template <int DV, int RB, typename T, typename C>
inline void chunk_values(float* acc, const float* p, int64_t p_stride, const float* alpha,
                         const AttentionItem<T, C>& a, int64_t kv_head, int64_t c0,
                         int64_t cn) {
  RowAccumulators<DV, RB> rows;
  rows.load(acc, 16 * DV, alpha);
  const int64_t bs = a.block_size;
  for (int64_t b0 = c0; b0 < c0 + cn; b0 += bs) {
    const C* vb = a.v_cache + a.block_table[b0 / bs] * a.c_stride_b + kv_head * a.c_stride_h;
    rows.add(p + (b0 - c0), p_stride, vb, a.c_stride_s, std::min(bs, c0 + cn - b0));
  }
  rows.store(acc, 16 * DV);
}

// `seen`: the positions the token attends to (its own included). T, the query's and
// output's dtype, is only read and written at the ends: everything between is fp32, so a
// bf16 or fp16 model takes this path too.
template <int DV, typename T, typename C>
void attend_decode_avx512(const AttentionItem<T, C>& a, int64_t kv_head, int64_t token,
                          int64_t seen, std::vector<float>& scratch) {
  constexpr int64_t D = 16 * DV;
  constexpr int RB = DV <= 4 ? 4 : 2;  // RB * DV accumulators: at most 16 registers
  const int64_t G = a.group, bs = a.block_size;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(C));
  const int64_t chunk = std::max<int64_t>(1, kDecodeChunkBytes / row_bytes / bs) * bs;
  scratch.resize(static_cast<size_t>(G * (2 * D + 3 + 16 + chunk)));
  float* qf = scratch.data();
  float* acc = qf + G * D;
  float* m = acc + G * D;
  float* l = m + G;
  float* alpha = l + G;
  float* mx = alpha + G;  // [G, 16]: the chunk's running max, lane-wise
  float* s = mx + G * 16;  // [G, chunk]: scores, then probabilities
  start_rows(a, kv_head, token, G, D, qf, acc, m, l);
  for (int64_t c0 = 0; c0 < seen; c0 += chunk) {
    const int64_t cn = std::min(chunk, seen - c0);
    for (int64_t r = 0; r < G; ++r) _mm512_storeu_ps(mx + r * 16, _mm512_set1_ps(kNegLarge));
    for (int64_t b0 = c0; b0 < c0 + cn; b0 += bs) {
      const int64_t block = a.block_table[b0 / bs];
      const C* kb = a.k_cache + block * a.c_stride_b + kv_head * a.c_stride_h;
      const int64_t in_block = std::min(bs, c0 + cn - b0);
      // The next block's keys now, this block's values for the value pass.
      if (b0 + bs < seen)
        prefetch_rows<true>(
            a.k_cache + a.block_table[b0 / bs + 1] * a.c_stride_b + kv_head * a.c_stride_h,
            a.c_stride_s, std::min(bs, seen - b0 - bs), row_bytes);
      prefetch_rows<false>(a.v_cache + block * a.c_stride_b + kv_head * a.c_stride_h,
                           a.c_stride_s, in_block, row_bytes);
      for (int64_t g = 0; g < in_block; g += 16) {
        const int64_t n = std::min<int64_t>(16, in_block - g);
        const __mmask16 live = static_cast<__mmask16>((1u << n) - 1u);
        const C* kg = kb + g * a.c_stride_s;
        float* sg = s + (b0 - c0 + g);
        for (int64_t r = 0; r < G; ++r) {
          const __m512 sc = group_scores<DV>(qf + r * D, kg, a.c_stride_s, n);
          _mm512_mask_storeu_ps(sg + r * chunk, live, sc);
          _mm512_storeu_ps(mx + r * 16, _mm512_max_ps(_mm512_loadu_ps(mx + r * 16), sc));
        }
      }
    }
    for (int64_t r = 0; r < G; ++r) {
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(_mm512_loadu_ps(mx + r * 16)));
      const __m512 mv = _mm512_set1_ps(m_new);
      float* sr = s + r * chunk;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < cn; j += 16) {
        const __mmask16 live = cn - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << (cn - j)) - 1u);
        const __m512 pv = _mm512_maskz_mov_ps(
            live, jsk::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sr + j), mv)));
        _mm512_mask_storeu_ps(sr + j, live, pv);
        sum = _mm512_add_ps(sum, pv);
      }
      alpha[r] = exp_nonpositive(m[r] - m_new);
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
      m[r] = m_new;
    }
    int64_t r = 0;
    for (; r + RB <= G; r += RB)
      chunk_values<DV, RB>(acc + r * D, s + r * chunk, chunk, alpha + r, a, kv_head, c0, cn);
    if constexpr (RB > 2)  // a group of 6 or 7 rows: 4 + 2 (+ 1) reads of the values
      for (; r + 2 <= G; r += 2)
        chunk_values<DV, 2>(acc + r * D, s + r * chunk, chunk, alpha + r, a, kv_head, c0, cn);
    for (; r < G; ++r)
      chunk_values<DV, 1>(acc + r * D, s + r * chunk, chunk, alpha + r, a, kv_head, c0, cn);
  }
  finish_rows(a, kv_head, token, G, D, acc, l);
}
#endif  // __AVX512F__

// The AVX-512 paths for the head dims they are built for: a decode item in any query dtype
// over an fp32, bf16 or fp16 cache; an item of several tokens with an fp32 query. Else
// the generic loops.
template <typename T, typename C>
inline void attend_any(const AttentionItem<T, C>& a, int64_t kv_head, int64_t first_token,
                       int64_t num_tokens, int64_t context_len, int64_t seq_len,
                       std::vector<float>& scratch) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<C, double>) {  // load16 widens fp32, bf16 and fp16
    if (num_tokens == 1) {  // a decode, or a chunk's last tile of one token
      const int64_t n = std::min(seq_len, context_len + first_token + 1);  // what it sees
      switch (a.head_dim) {
        case 16: return attend_decode_avx512<1>(a, kv_head, first_token, n, scratch);
        case 32: return attend_decode_avx512<2>(a, kv_head, first_token, n, scratch);
        case 64: return attend_decode_avx512<4>(a, kv_head, first_token, n, scratch);
        case 128: return attend_decode_avx512<8>(a, kv_head, first_token, n, scratch);
        default: break;
      }
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    switch (a.head_dim) {
      case 16: return attend_avx512<1>(a, kv_head, first_token, num_tokens, context_len, seq_len, scratch);
      case 32: return attend_avx512<2>(a, kv_head, first_token, num_tokens, context_len, seq_len, scratch);
      case 64: return attend_avx512<4>(a, kv_head, first_token, num_tokens, context_len, seq_len, scratch);
      case 128: return attend_avx512<8>(a, kv_head, first_token, num_tokens, context_len, seq_len, scratch);
      default: break;
    }
  }
#endif
  attend(a, kv_head, first_token, num_tokens, context_len, seq_len, scratch);
}

void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4, "caches are [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must share one shape and layout");
  TORCH_CHECK(k_cache.stride(3) == 1, "the cache's head dim must be contiguous");
}

}  // namespace

// Causal attention of every sequence's new tokens over its cached context. Sequence b owns
// query rows query_start_loc[b]:query_start_loc[b+1]; its context is seq_lens[b] tokens,
// the last of which are the new ones. Work is split into (sequence, kv head, token tile)
// items so a batch of one-token decodes and a long prefill chunk both fill the threads.
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& query_start_loc,
                              const at::Tensor& seq_lens, const at::Tensor& block_tables,
                              double scale, int64_t tile_tokens) {
  check_cache(k_cache, v_cache);
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query is [T, heads, head_dim]");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt &&
                  seq_lens.scalar_type() == at::kInt &&
                  block_tables.scalar_type() == at::kInt,
              "query_start_loc, seq_lens and block_tables are int32");
  TORCH_CHECK(query_start_loc.is_contiguous() && seq_lens.is_contiguous() &&
                  block_tables.stride(1) == 1,
              "metadata tensors must be contiguous");
  const int64_t num_q_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = k_cache.size(2), block_size = k_cache.size(1);
  TORCH_CHECK(num_q_heads % num_kv_heads == 0, "query heads must group over kv heads");
  TORCH_CHECK(k_cache.size(3) == head_dim, "query and cache head dims differ");
  const int64_t num_seqs = seq_lens.size(0);
  auto out = at::empty(query.sizes(), query.options());
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t tile = std::max<int64_t>(tile_tokens, 1);
  // Items of sequence b start at first_item[b]; each is (token tile, kv head).
  std::vector<int64_t> first_item(num_seqs + 1, 0);
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = qsl[b + 1] - qsl[b];
    TORCH_CHECK(q_len >= 0 && q_len <= lens[b], "query longer than its sequence");
    first_item[b + 1] = first_item[b] + (q_len + tile - 1) / tile * num_kv_heads;
  }
  const int64_t total = first_item[num_seqs];
  if (total == 0) return out;
  jsk::dispatch_with_cache(
      query.scalar_type(), k_cache.scalar_type(), "paged_attention", [&](auto t, auto c) {
        using scalar_t = decltype(t);
        using cache_t = decltype(c);
        AttentionItem<scalar_t, cache_t> a{query.data_ptr<scalar_t>(),
                                  query.stride(0),
                                  query.stride(1),
                                  k_cache.data_ptr<cache_t>(),
                                  v_cache.data_ptr<cache_t>(),
                                  k_cache.stride(0),
                                  k_cache.stride(1),
                                  k_cache.stride(2),
                                  nullptr,
                                  out.data_ptr<scalar_t>(),
                                  out.stride(0),
                                  out.stride(1),
                                  head_dim,
                                  block_size,
                                  num_q_heads / num_kv_heads,
                                  static_cast<float>(scale)};
        const int32_t* tables = block_tables.data_ptr<int32_t>();
        const int64_t table_stride = block_tables.stride(0);
        at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> scratch;
          AttentionItem<scalar_t, cache_t> item = a;
          for (int64_t i = begin; i < end; ++i) {
            const int64_t b =
                std::upper_bound(first_item.begin(), first_item.end(), i) - first_item.begin() - 1;
            const int64_t local = i - first_item[b];
            const int64_t tile_index = local / num_kv_heads, kv_head = local % num_kv_heads;
            const int64_t q_start = qsl[b], q_len = qsl[b + 1] - qsl[b], seq_len = lens[b];
            const int64_t first = tile_index * tile;
            const int64_t count = std::min(tile, q_len - first);
            item.q = a.q + q_start * a.q_stride_t;
            item.out = a.out + q_start * a.o_stride_t;
            item.block_table = tables + b * table_stride;
            attend_any(item, kv_head, first, count, seq_len - q_len, seq_len, scratch);
          }
        });
      });
  return out;
}

// Scatters the step's new keys and values into their cache slots; negative slots are padding.
void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
              const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_cache(k_cache, v_cache);
  TORCH_CHECK(key.dim() == 3 && key.stride(2) == 1 && value.stride(2) == 1,
              "key/value are [T, kv_heads, head_dim] with a contiguous head dim");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "key and value dtypes differ");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "slot_mapping is contiguous int64");
  const int64_t num_tokens = key.size(0), heads = key.size(1), dim = key.size(2);
  const int64_t block_size = k_cache.size(1);
  const int64_t capacity = k_cache.size(0) * block_size;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  jsk::dispatch_with_cache(key.scalar_type(), k_cache.scalar_type(), "write_kv", [&](auto t, auto c) {
    using scalar_t = decltype(t);
    using cache_t = decltype(c);
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    cache_t* kc = k_cache.data_ptr<cache_t>();
    cache_t* vc = v_cache.data_ptr<cache_t>();
    for (int64_t t = 0; t < num_tokens; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      TORCH_CHECK(slot < capacity, "slot ", slot, " is outside the cache");
      const int64_t base = (slot / block_size) * k_cache.stride(0) + (slot % block_size) * k_cache.stride(1);
      for (int64_t h = 0; h < heads; ++h) {
        jsk::store_row(kc + base + h * k_cache.stride(2), k + t * key.stride(0) + h * key.stride(1),
                       dim);
        jsk::store_row(vc + base + h * v_cache.stride(2),
                       v + t * value.stride(0) + h * value.stride(1), dim);
      }
    }
  });
}

template <typename T>
void rms_norm_row(const T* x, const T* residual, T* summed, const T* w, T* out, int64_t hidden,
                  float eps, float* h) {
  if (residual != nullptr) {
    for (int64_t i = 0; i < hidden; ++i) {
      summed[i] = static_cast<T>(as_float(x[i]) + as_float(residual[i]));
      h[i] = as_float(summed[i]);
    }
  } else {
    for (int64_t i = 0; i < hidden; ++i) h[i] = as_float(x[i]);
  }
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < hidden; ++i) sq += h[i] * h[i];
  const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(hidden) + eps);
  for (int64_t i = 0; i < hidden; ++i) {
    const float normed = as_float(static_cast<T>(h[i] * rstd));
    out[i] = static_cast<T>(as_float(w[i]) * normed);
  }
}

// RMSNorm with the residual add fused: returns (weight * normed, x + residual). Rounds
// where Hugging Face's Llama does: the sum and the normalised value in the storage dtype.
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight,
                                    double eps, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.stride(-1) == 1 && weight.is_contiguous(), "rows must be contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x dtypes differ");
  const int64_t hidden = x.size(-1);
  const int64_t rows = x.numel() / std::max<int64_t>(hidden, 1);
  auto x2 = x.reshape({rows, hidden});
  auto out = at::empty({rows, hidden}, x.options());
  const bool has_residual = residual.has_value();
  at::Tensor res2, summed;
  if (has_residual) {
    res2 = residual->reshape({rows, hidden});
    TORCH_CHECK(res2.stride(1) == 1 && res2.scalar_type() == x.scalar_type(),
                "residual must match x");
    summed = at::empty({rows, hidden}, x.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    // Rows per task: 64K elements. A decode step's [64, 512] norm takes ~16 us on one
    // thread and no less on two, and each parallel region is a barrier that stalls for a
    // scheduler slice (ms) whenever the other thread is preempted on a shared box.
    const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(hidden, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> h(hidden);
      for (int64_t r = begin; r < end; ++r) {
        rms_norm_row<scalar_t>(
            x2.data_ptr<scalar_t>() + r * x2.stride(0),
            has_residual ? res2.data_ptr<scalar_t>() + r * res2.stride(0) : nullptr,
            has_residual ? summed.data_ptr<scalar_t>() + r * hidden : nullptr, w,
            out.data_ptr<scalar_t>() + r * hidden, hidden, static_cast<float>(eps), h.data());
      }
    });
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (has_residual) return {out.view(shape), summed.view(shape)};
  return {out.view(shape)};
}

template <typename T>
void rotate_token(const at::Tensor& src, const at::Tensor& dst, int64_t t, const float* cs,
                  int64_t half) {
  const int64_t dim = 2 * half;
  for (int64_t h = 0; h < src.size(1); ++h)
    jsk::rotate_head<T>(src.data_ptr<T>() + t * src.stride(0) + h * src.stride(1),
                                 dst.data_ptr<T>() + (t * dst.size(1) + h) * dim, cs, half);
}

// Rotary embedding (rotate-half layout) of q and k at their positions, into new contiguous
// tensors. cos_sin is [max_positions, head_dim] fp32: cos in the first half, sin in the second.
std::vector<at::Tensor> rotary(const at::Tensor& positions, const at::Tensor& query,
                                  const at::Tensor& key, const at::Tensor& cos_sin) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "positions are contiguous int64");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous(),
              "cos_sin is contiguous fp32");
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1, "head dims must be contiguous");
  const int64_t num_tokens = query.size(0), dim = query.size(2), half = dim / 2;
  auto q_out = at::empty(query.sizes(), query.options());
  auto k_out = at::empty(key.sizes(), key.options());
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* table = cos_sin.data_ptr<float>();
  const int64_t max_pos = cos_sin.size(0);
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " beyond the rotary table");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "rotary", [&] {
    at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* cs = table + pos[t] * dim;
        rotate_token<scalar_t>(query, q_out, t, cs, half);
        rotate_token<scalar_t>(key, k_out, t, cs, half);
      }
    });
  });
  return {q_out, k_out};
}

// y = x w^T * scales for int8 weights [N, K] with one fp32 scale per output channel, x
// [M, K] in fp32/bf16/fp16 (small M: a decode batch). Weights are the bytes that bound a
// decode step: each is read once per row of x, widened to fp32 in registers. Four output
// channels and two halves of K make eight independent accumulator chains, enough to hide
// the FMA latency. Threads split the output channels.
template <typename T>
void int8_four_channels(const T* x, const int8_t* w, int64_t K, const float* scale, T* y) {
  const int8_t *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  const int64_t h = K / 2;
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t k = 0; k < h; ++k) {
    const float xa = as_float(x[k]), xb = as_float(x[k + h]);
    a0 += xa * static_cast<float>(w0[k]);
    a1 += xa * static_cast<float>(w1[k]);
    a2 += xa * static_cast<float>(w2[k]);
    a3 += xa * static_cast<float>(w3[k]);
    b0 += xb * static_cast<float>(w0[k + h]);
    b1 += xb * static_cast<float>(w1[k + h]);
    b2 += xb * static_cast<float>(w2[k + h]);
    b3 += xb * static_cast<float>(w3[k + h]);
  }
  if (K % 2) {
    const float xl = as_float(x[K - 1]);
    a0 += xl * w0[K - 1];
    a1 += xl * w1[K - 1];
    a2 += xl * w2[K - 1];
    a3 += xl * w3[K - 1];
  }
  y[0] = static_cast<T>((a0 + b0) * scale[0]);
  y[1] = static_cast<T>((a1 + b1) * scale[1]);
  y[2] = static_cast<T>((a2 + b2) * scale[2]);
  y[3] = static_cast<T>((a3 + b3) * scale[3]);
}

template <typename T>
void int8_one_channel(const T* x, const int8_t* w, int64_t K, float scale, T* y) {
  float d0 = 0.0f;
#pragma omp simd reduction(+ : d0)
  for (int64_t k = 0; k < K; ++k) d0 += as_float(x[k]) * static_cast<float>(w[k]);
  *y = static_cast<T>(d0 * scale);
}

template <typename T>
void int8_channels(const T* x, int64_t ldx, int64_t M, const int8_t* w, int64_t K,
                   const float* scales, T* y, int64_t ldy, int64_t begin, int64_t end) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * ldx;
    T* yr = y + m * ldy;
    int64_t n = begin;
    for (; n + 4 <= end; n += 4) int8_four_channels<T>(xr, w + n * K, K, scales + n, yr + n);
    for (; n < end; ++n) int8_one_channel<T>(xr, w + n * K, K, scales[n], yr + n);
  }
}

// decode_linear.cpp: the same pass with fp32 activations, one weight row at a time in
// address order (what the hardware prefetchers follow best).
at::Tensor decode_linear_int8(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& scales);

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x is [M, K] with contiguous rows");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.dim() == 2,
              "weight is contiguous int8 [N, K]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales are fp32 [N]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && scales.numel() == N, "shapes of x, weight, scales differ");
  if (x.scalar_type() == at::kFloat) return decode_linear_int8(x, weight, scales);
  auto y = at::empty({M, N}, x.options());
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_linear", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t ldx = x.stride(0);
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      int8_channels<scalar_t>(xp, ldx, M, w, K, sc, yp, N, begin, end);
    });
  });
  return y;
}

TORCH_LIBRARY(jetserve_cpu, m) {
  m.def("paged_attention", &paged_attention);
  m.def("write_kv", &write_kv);
  m.def("rms_norm", &rms_norm);
  m.def("rotary", &rotary);
  m.def("int8_linear", &int8_linear);
}
