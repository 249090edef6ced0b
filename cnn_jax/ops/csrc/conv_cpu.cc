// Native CPU kernels for the convolution's weight gradient (seed 004):
//
//   dW[i, j, c, o] = sum_{n, p, q} Xpad[n, p*S_h + i, q*S_w + j, c] * dY[n, p, q, o]
//
// the correlation of the (zero-padded) input with the output gradient, summed
// over the batch and every output position: the shared-weight rule. Called from
// JAX through the XLA FFI (cnn_jax/ops/native.py); the pure-JAX formulations in
// cnn_jax/ops/conv_grads.py compute the same sums and are the reference in
// tests/test_native.py.
//
// Layout of the computation. For one kernel row i, the kw*C_in weights of that
// row are contiguous in Xpad for every output position (the taps j = 0..kw-1 of
// one position sit side by side, C_in floats each), so
//
//   dW[i] (kw*C_in x C_out) = sum over positions of  a_i(pos)^T  dY(pos)
//
// with a_i(pos) = the kw*C_in floats of Xpad starting at (n, p*S_h + i, q*S_w, 0).
// That is a GEMM whose reduction runs over the N*H_out*W_out positions; the
// microkernel keeps an MR x (16*V) tile of dW in AVX-512 registers, broadcasts MR
// input values and loads V vectors of dY per position, and never builds a patch
// matrix. Positions are taken in chunks of whole output rows sized for L2.
//
// Threads: XLA's intra-op pool (the FFI ThreadPool context). Small dW (the
// common case: up to 512 KiB) splits the positions into fixed groups, each
// summed into a private dW, the partials added in order at the end; large dW
// splits its rows instead, every thread reading all positions. Each output
// element is summed in an order fixed by the shapes and the pool size, never
// by thread timing, so results are bit-for-bit reproducible.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using cnn_native::NumWorkers;
using cnn_native::ParallelFor;

// ---------------------------------------------------------------------------
// Chunks of the input, zero-padded in a per-thread buffer that stays in cache
// (a padded copy of the whole tensor cost as much as the arithmetic on
// 16-channel layers: one more write and read of X through memory).
// ---------------------------------------------------------------------------
struct Geometry {
  int64_t n, h, w, ci, ho, wo, kh, kw, sh, sw, pt, pl, hp, wp;
};

// Output rows [p0, p1) of images [n0, n1): whole images when n1 - n0 > 1.
struct Chunk {
  int64_t n0, n1, p0, p1;
};

// Chunks of about `budget` bytes of padded input rows, at least `min_chunks`
// of them where the shapes allow.
std::vector<Chunk> MakeChunks(const Geometry& g, int64_t budget, int64_t min_chunks) {
  std::vector<Chunk> chunks;
  const int64_t image_bytes = g.hp * g.wp * g.ci * 4;
  if (image_bytes <= budget) {
    int64_t per = std::max<int64_t>(1, budget / std::max<int64_t>(image_bytes, 1));
    per = std::min(per, std::max<int64_t>(1, (g.n + min_chunks - 1) / min_chunks));
    for (int64_t n0 = 0; n0 < g.n; n0 += per) chunks.push_back({n0, std::min(g.n, n0 + per), 0, g.ho});
    if (static_cast<int64_t>(chunks.size()) >= min_chunks || g.ho == 1) return chunks;
    chunks.clear();   // too few images: split their rows instead
  }
  const int64_t row_bytes = std::max<int64_t>(1, g.sh * g.wp * g.ci * 4);
  int64_t rows = std::max<int64_t>(1, budget / row_bytes);
  const int64_t per_image = std::max<int64_t>(1, (min_chunks + g.n - 1) / g.n);
  rows = std::min(rows, std::max<int64_t>(1, (g.ho + per_image - 1) / per_image));
  for (int64_t n0 = 0; n0 < g.n; ++n0)
    for (int64_t p0 = 0; p0 < g.ho; p0 += rows) chunks.push_back({n0, n0 + 1, p0, std::min(g.ho, p0 + rows)});
  return chunks;
}

// Where a chunk's padded input lives: padded row r of image n is at
// base + (n - n0) * img_stride + (r - r_lo) * row_stride.
struct ChunkView {
  const float* base;
  int64_t img_stride, row_stride, r_lo;
};

ChunkView ViewChunk(const Geometry& g, const float* x, const Chunk& c, bool padded,
                    std::vector<float>& buf) {
  const int64_t r_lo = c.p0 * g.sh;
  const int64_t r_hi = (c.p1 - 1) * g.sh + g.kh;
  if (!padded) {   // Xpad is X: read it in place
    return {x + (c.n0 * g.h + r_lo) * g.w * g.ci, g.h * g.w * g.ci, g.w * g.ci, r_lo};
  }
  const int64_t rows = r_hi - r_lo, row = g.wp * g.ci;
  buf.resize((c.n1 - c.n0) * rows * row);
  float* dst = buf.data();
  for (int64_t n = c.n0; n < c.n1; ++n) {
    for (int64_t r = r_lo; r < r_hi; ++r, dst += row) {
      const int64_t ih = r - g.pt;
      if (ih < 0 || ih >= g.h) {
        std::memset(dst, 0, row * sizeof(float));
        continue;
      }
      const int64_t left = g.pl * g.ci, body = g.w * g.ci;
      std::memset(dst, 0, left * sizeof(float));
      std::memcpy(dst + left, x + (n * g.h + ih) * body, body * sizeof(float));
      std::memset(dst + left + body, 0, (row - left - body) * sizeof(float));
    }
  }
  return {buf.data(), rows * row, row, r_lo};
}

// ---------------------------------------------------------------------------
// The microkernel: acc[m][v] += a[m] * b[16 v .. 16 v + 15] over positions.
// ---------------------------------------------------------------------------
struct Rows {             // the positions of one chunk
  const float* a0;        // Xpad at (n, p*S_h + i, q*S_w, r0) of the first position
  const int64_t* a_off;   // per position: offset of its Xpad start from a0
  const float* b0;        // dY at the first position, column o0
  int64_t count;          // positions (whole output rows, contiguous in dY)
  int64_t b_col;          // dY stride between positions (C_out)
};

// acc (MR x V vectors) is loaded from c and stored back under the mask `last`
// for its last vector: the caller zeroes c first where the tile starts a sum.
// dY is read with full-width loads, so its rows must hold whole vectors (the
// caller pads a dY whose C_out is not a multiple of 16). GCC keeps the
// accumulators in registers only when the loops over them are fully unrolled
// (hence the pragmas: without them the 24 x 1 tile kept its accumulators in
// memory) and the loop body has no select on them and no masked loads (a
// masked load in the loop made it store every accumulator at every position).
template <int MR, int V>
__attribute__((target("avx512f"))) void MicroTile(const Rows& r, float* c,
                                                   int64_t ldc, __mmask16 last) {
  __m512 acc[MR][V];
#pragma GCC unroll 32
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      acc[m][v] = _mm512_maskz_loadu_ps(v == V - 1 ? last : 0xFFFF, c + m * ldc + 16 * v);
  // One flat loop with a per-position offset table: with a nested loop over
  // rows GCC stored and reloaded every accumulator once per row.
  const float* b = r.b0;
  const int64_t b_col = r.b_col;
  for (int64_t t = 0; t < r.count; ++t) {
    const float* a = r.a0 + r.a_off[t];
    __m512 bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 32
    for (int m = 0; m < MR; ++m) {
      __m512 av = _mm512_set1_ps(a[m]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[m][v] = _mm512_fmadd_ps(av, bv[v], acc[m][v]);
    }
    b += b_col;
  }
#pragma GCC unroll 32
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(c + m * ldc + 16 * v, v == V - 1 ? last : 0xFFFF, acc[m][v]);
}

using TileFn = void (*)(const Rows&, float*, int64_t, __mmask16);

template <int V, int... M>
constexpr std::array<TileFn, sizeof...(M)> MakeTable(std::integer_sequence<int, M...>) {
  return {&MicroTile<M + 1, V>...};
}

// Row counts per tile: V = 2 (32 outputs) keeps 12 x 2 accumulators, V = 1
// keeps 24; both leave registers for the dY vectors and the broadcast.
constexpr int kMaxRows1 = 24;
constexpr int kMaxRows2 = 12;
const auto kTiles1 = MakeTable<1>(std::make_integer_sequence<int, kMaxRows1>{});
const auto kTiles2 = MakeTable<2>(std::make_integer_sequence<int, kMaxRows2>{});

struct DwProblem {
  Geometry g;
  int64_t co;
  bool padded;             // any nonzero padding
  const float* x;          // (n, h, w, ci)
  const float* dy;         // (n, ho, wo, co)
  int64_t m;               // kw * ci: rows of dW per kernel row
  std::vector<Chunk> chunks;
};

// dW rows [r_lo, r_hi) of every kernel row, summed over the chunks [k_lo, k_hi),
// into c (kh, m, co): added to what c holds, or written over it (zeroed first)
// when `overwrite`.
void DwBlock(const DwProblem& p, int64_t k_lo, int64_t k_hi, int64_t r_lo,
             int64_t r_hi, float* c, bool overwrite) {
  const Geometry& g = p.g;
  const int v_count = p.co > 16 ? 2 : 1;
  const int max_rows = v_count == 2 ? kMaxRows2 : kMaxRows1;
  const int64_t co_step = 16 * v_count;
  if (overwrite) {
    for (int64_t i = 0; i < g.kh; ++i)
      std::memset(c + (i * p.m + r_lo) * p.co, 0, (r_hi - r_lo) * p.co * sizeof(float));
  }
  thread_local std::vector<float> buf;
  thread_local std::vector<float> dy_tail;
  std::vector<int64_t> a_off;
  const float* dy_end = p.dy + g.n * g.ho * g.wo * p.co;
  for (int64_t k = k_lo; k < k_hi; ++k) {
    const Chunk& ch = p.chunks[k];
    const ChunkView view = ViewChunk(g, p.x, ch, p.padded, buf);
    const int64_t count = (ch.n1 - ch.n0) * (ch.p1 - ch.p0) * g.wo;
    const float* dy0 = p.dy + (ch.n0 * g.ho + ch.p0) * g.wo * p.co;   // rows contiguous
    a_off.resize(count);
    for (int64_t i = 0; i < g.kh; ++i) {
      // Offset of each position's kw*C_in run (kernel row i) in the chunk view.
      int64_t t = 0;
      for (int64_t n = ch.n0; n < ch.n1; ++n)
        for (int64_t pp = ch.p0; pp < ch.p1; ++pp) {
          const int64_t row = (n - ch.n0) * view.img_stride +
                              (pp * g.sh + i - view.r_lo) * view.row_stride;
          for (int64_t q = 0; q < g.wo; ++q) a_off[t++] = row + q * g.sw * g.ci;
        }
      for (int64_t r0 = r_lo; r0 < r_hi; r0 += max_rows) {
        const int mr = static_cast<int>(std::min<int64_t>(max_rows, r_hi - r0));
        for (int64_t o0 = 0; o0 < p.co; o0 += co_step) {
          const int64_t width = std::min<int64_t>(co_step, p.co - o0);
          // Vectors in this tile and the mask of its last one. A 16-wide tile
          // in a V = 2 problem (its last columns) takes at most 12 rows, the
          // same r0 stepping.
          const int v = width > 16 ? 2 : 1;
          const int64_t last = width - 16 * (v - 1);
          const __mmask16 mask = static_cast<__mmask16>((1u << last) - 1u);
          float* tile = c + (i * p.m + r0) * p.co + o0;
          const TileFn fn = v == 2 ? kTiles2[mr - 1] : kTiles1[mr - 1];
          // The tile loads 16 * v floats of dY per position. Where C_out is not
          // a multiple of 16 that reads into the next position (lanes that are
          // never stored), which is in bounds except for the last positions
          // of dY: those few are run from a zero-padded copy.
          const int64_t room = dy_end - (dy0 + o0) - 16 * v;
          const int64_t safe = room < 0 ? 0 : std::min(count, room / p.co + 1);
          fn(Rows{view.base + r0, a_off.data(), dy0 + o0, safe, p.co}, tile, p.co, mask);
          if (safe < count) {
            dy_tail.assign((count - safe) * 16 * v, 0.0f);
            for (int64_t t = safe; t < count; ++t)
              std::memcpy(dy_tail.data() + (t - safe) * 16 * v, dy0 + t * p.co + o0,
                          width * sizeof(float));
            fn(Rows{view.base + r0, a_off.data() + safe, dy_tail.data(), count - safe, 16 * v},
               tile, p.co, mask);
          }
        }
      }
    }
  }
}

ffi::Error ConvWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                          int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                          int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                          int64_t pad_right) {
  auto xd = x.dimensions();
  auto yd = dy.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4) {
    return ffi::Error::InvalidArgument("cnn_conv2d_weight_grad: expects 4-D NHWC x, dy and (kh, kw, C_in, C_out) dw");
  }
  DwProblem p;
  Geometry& g = p.g;
  g.n = xd[0]; g.h = xd[1]; g.w = xd[2]; g.ci = xd[3];
  g.ho = yd[1]; g.wo = yd[2]; p.co = yd[3];
  g.kh = kh; g.kw = kw; g.sh = sh; g.sw = sw; g.pt = pad_top; g.pl = pad_left;
  if (yd[0] != g.n || wd[0] != kh || wd[1] != kw || wd[2] != g.ci || wd[3] != p.co ||
      pad_top < 0 || pad_bottom < 0 || pad_left < 0 || pad_right < 0 || sh < 1 || sw < 1) {
    return ffi::Error::InvalidArgument("cnn_conv2d_weight_grad: inconsistent shapes or attributes");
  }
  g.hp = g.h + pad_top + pad_bottom;
  g.wp = g.w + pad_left + pad_right;
  if ((g.ho - 1) * sh + kh > g.hp || (g.wo - 1) * sw + kw > g.wp) {
    return ffi::Error::InvalidArgument("cnn_conv2d_weight_grad: output larger than the padded input allows");
  }
  p.m = kw * g.ci;
  float* out = dw->typed_data();
  const int64_t out_size = kh * p.m * p.co;
  if (g.n * g.ho * g.wo == 0) {
    std::memset(out, 0, out_size * sizeof(float));
    return ffi::Error::Success();
  }
  const int workers = NumWorkers(pool);
  p.padded = pad_top || pad_bottom || pad_left || pad_right;
  p.x = x.typed_data();
  p.dy = dy.typed_data();
  // Chunks of ~256 KiB of padded input (with their dY rows, within L2).
  p.chunks = MakeChunks(g, 256 << 10, 2 * workers);
  const int64_t n_chunks = static_cast<int64_t>(p.chunks.size());

  const int64_t dw_bytes = out_size * 4;
  if (dw_bytes <= (512 << 10) || workers == 1) {
    // Fixed groups of consecutive chunks, each summed in order into its own
    // partial dW, then the partials summed in order: the result does not
    // depend on which thread ran which group (training stays bit-for-bit
    // reproducible, e.g. across a checkpoint resume).
    const int64_t parts = std::min<int64_t>(n_chunks, std::max<int64_t>(4, 2 * workers));
    std::unique_ptr<float[]> partial(new float[parts * out_size]);
    ParallelFor(pool, parts, workers, [&](int64_t part, int) {
      const int64_t k_lo = part * n_chunks / parts, k_hi = (part + 1) * n_chunks / parts;
      DwBlock(p, k_lo, k_hi, 0, p.m, partial.get() + part * out_size, true);
    });
    std::memcpy(out, partial.get(), dw_bytes);
    for (int64_t part = 1; part < parts; ++part) {
      const float* s = partial.get() + part * out_size;
      for (int64_t e = 0; e < out_size; ++e) out[e] += s[e];
    }
  } else {
    // Split dW rows (within every kernel row) into blocks of whole tiles.
    const int64_t tile_rows = p.co > 16 ? kMaxRows2 : kMaxRows1;
    const int64_t tiles = (p.m + tile_rows - 1) / tile_rows;
    const int64_t items = std::min<int64_t>(tiles, 4 * workers);
    const int64_t per = (tiles + items - 1) / items;
    ParallelFor(pool, items, workers, [&](int64_t it, int) {
      const int64_t r_lo = std::min(p.m, it * per * tile_rows);
      const int64_t r_hi = std::min(p.m, (it + 1) * per * tile_rows);
      if (r_lo < r_hi) DwBlock(p, 0, n_chunks, r_lo, r_hi, out, true);
    });
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Forward: Y[n, p, q, o] = sum_i sum_r Xpad[n, p*S_h + i, q*S_w*C_in + r] * W[i, r, o]
// (r = j*C_in + c runs over one kernel row's kw*C_in weights, contiguous in
// Xpad as for dW). The same kernel gives dX for stride 1: the notes' dX is the
// forward convolution of the padded dY with the flipped, channel-swapped W.
// A tile holds MP consecutive positions of one output row x V vectors of
// outputs; each weight row (V vectors) is loaded once and multiplied by MP
// broadcast inputs.
// ---------------------------------------------------------------------------
// LOAD: add to what y holds (a later block of the reduction) instead of
// starting from zero; a template flag, since a runtime select on the
// accumulators made GCC spill them. W is read with full-width loads (the
// caller pads a W whose C_out is not a multiple of 16); y is loaded and
// stored under the mask `last` for the last vector.
template <int MP, int V, bool LOAD>
__attribute__((target("avx512f"))) void FwdTile(const float* a, int64_t a_step,
                                                 int64_t a_krow, int64_t rows_i,
                                                 int64_t m, const float* w, int64_t w_krow,
                                                 int64_t ldw, float* y, int64_t ldy,
                                                 __mmask16 last) {
  __m512 acc[MP][V];
#pragma GCC unroll 16
  for (int mm = 0; mm < MP; ++mm)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      acc[mm][v] = LOAD ? _mm512_maskz_loadu_ps(v == V - 1 ? last : 0xFFFF, y + mm * ldy + 16 * v)
                        : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows_i; ++i) {
    const float* ai = a + i * a_krow;
    const float* wi = w + i * w_krow;
    for (int64_t r = 0; r < m; ++r) {
      __m512 wv[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(wi + r * ldw + 16 * v);
#pragma GCC unroll 16
      for (int mm = 0; mm < MP; ++mm) {
        __m512 av = _mm512_set1_ps(ai[mm * a_step + r]);
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[mm][v] = _mm512_fmadd_ps(av, wv[v], acc[mm][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int mm = 0; mm < MP; ++mm)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(y + mm * ldy + 16 * v, v == V - 1 ? last : 0xFFFF, acc[mm][v]);
}

using FwdFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, const float*,
                       int64_t, int64_t, float*, int64_t, __mmask16);

template <int V, bool LOAD, int... M>
constexpr std::array<FwdFn, sizeof...(M)> MakeFwdTable(std::integer_sequence<int, M...>) {
  return {&FwdTile<M + 1, V, LOAD>...};
}

// Positions per tile for V output vectors: MP * V accumulators <= 24.
constexpr int kFwdPositions[5] = {0, 16, 12, 8, 6};

template <bool LOAD>
struct FwdTables {
  static constexpr auto t1 = MakeFwdTable<1, LOAD>(std::make_integer_sequence<int, 16>{});
  static constexpr auto t2 = MakeFwdTable<2, LOAD>(std::make_integer_sequence<int, 12>{});
  static constexpr auto t3 = MakeFwdTable<3, LOAD>(std::make_integer_sequence<int, 8>{});
  static constexpr auto t4 = MakeFwdTable<4, LOAD>(std::make_integer_sequence<int, 6>{});
  static FwdFn Get(int v, int mp) {
    switch (v) {
      case 1: return t1[mp - 1];
      case 2: return t2[mp - 1];
      case 3: return t3[mp - 1];
      default: return t4[mp - 1];
    }
  }
};

FwdFn FwdKernel(int v, bool load, int mp) {
  return load ? FwdTables<true>::Get(v, mp) : FwdTables<false>::Get(v, mp);
}

// Bytes of weight panel (reduction rows x output block) a tile streams: kept
// within L1 by splitting the reduction into blocks when it is larger.
constexpr int64_t kFwdPanelBytes = 32 << 10;

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                       int64_t sh, int64_t sw, int64_t pad_top, int64_t pad_bottom,
                       int64_t pad_left, int64_t pad_right) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("cnn_conv2d_forward: expects 4-D NHWC x and y and (kh, kw, C_in, C_out) w");
  }
  const int64_t n = xd[0], h = xd[1], wi = xd[2], ci = xd[3];
  const int64_t kh = wd[0], kw = wd[1], co = wd[3];
  const int64_t ho = yd[1], wo = yd[2];
  const int64_t hp = h + pad_top + pad_bottom, wp = wi + pad_left + pad_right;
  if (wd[2] != ci || yd[0] != n || yd[3] != co || sh < 1 || sw < 1 || pad_top < 0 ||
      pad_bottom < 0 || pad_left < 0 || pad_right < 0 ||
      (ho - 1) * sh + kh > hp || (wo - 1) * sw + kw > wp) {
    return ffi::Error::InvalidArgument("cnn_conv2d_forward: inconsistent shapes or attributes");
  }
  float* out = y->typed_data();
  if (n * ho * wo * co == 0) return ffi::Error::Success();
  const int workers = NumWorkers(pool);
  const Geometry g{n, h, wi, ci, ho, wo, kh, kw, sh, sw, pad_top, pad_left, hp, wp};
  const bool padded = pad_top || pad_bottom || pad_left || pad_right;
  const int64_t m = kw * ci;
  // The tiles load whole vectors of W: where C_out is not a multiple of 16,
  // W is copied once with its rows zero-padded to one.
  const int64_t ldw = (co + 15) / 16 * 16;
  const float* wt = w.typed_data();
  std::vector<float> w_pad;
  if (ldw != co) {
    w_pad.assign(kh * m * ldw, 0.0f);
    for (int64_t r = 0; r < kh * m; ++r)
      std::memcpy(w_pad.data() + r * ldw, wt + r * co, co * sizeof(float));
    wt = w_pad.data();
  }

  // Output-channel blocks of up to 64 (4 vectors); chunks of ~256 KiB of
  // padded input. One item = a chunk and all its blocks (the chunk padded
  // once), or a (chunk, block) pair when there are too few chunks to share.
  const int64_t block = std::min<int64_t>(64, ((co + 15) / 16) * 16);
  const int64_t blocks = (co + block - 1) / block;
  const std::vector<Chunk> chunks = MakeChunks(g, 256 << 10, 4 * workers);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t split = n_chunks >= 2 * workers ? 1 : blocks;
  // The reduction (kernel rows i, then r within a row) in blocks whose weight
  // panel fits kFwdPanelBytes: all kernel rows at once when it fits, else
  // blocks of r within each kernel row.
  const int64_t panel_row = block * 4;
  struct KBlock { int64_t i0, rows_i, r0, m; };
  std::vector<KBlock> kblocks;
  if (kh * m * panel_row <= kFwdPanelBytes) {
    kblocks.push_back({0, kh, 0, m});
  } else {
    const int64_t rb = std::max<int64_t>(16, kFwdPanelBytes / panel_row);
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t r0 = 0; r0 < m; r0 += rb) kblocks.push_back({i, 1, r0, std::min(rb, m - r0)});
  }
  ParallelFor(pool, n_chunks * split, workers, [&](int64_t item, int) {
    const Chunk& ch = chunks[item / split];
    thread_local std::vector<float> buf;
    const ChunkView view = ViewChunk(g, x.typed_data(), ch, padded, buf);
    const int64_t b_lo = split == 1 ? 0 : item % split;
    const int64_t b_hi = split == 1 ? blocks : b_lo + 1;
    for (int64_t b = b_lo; b < b_hi; ++b) {
      const int64_t o0 = b * block;
      const int64_t width = std::min(block, co - o0);
      const int v = static_cast<int>((width + 15) / 16);
      const int64_t last = width - 16 * (v - 1);
      const __mmask16 mask = static_cast<__mmask16>((1u << last) - 1u);
      const int mp_max = kFwdPositions[v];
      for (size_t kb = 0; kb < kblocks.size(); ++kb) {
        const KBlock& blk = kblocks[kb];
        const float* wblk = wt + (blk.i0 * m + blk.r0) * ldw + o0;
        for (int64_t nn = ch.n0; nn < ch.n1; ++nn)
          for (int64_t pp = ch.p0; pp < ch.p1; ++pp) {
            const float* arow = view.base + (nn - ch.n0) * view.img_stride +
                                (pp * sh + blk.i0 - view.r_lo) * view.row_stride + blk.r0;
            float* yrow = out + (nn * ho + pp) * wo * co + o0;
            for (int64_t q0 = 0; q0 < wo; q0 += mp_max) {
              const int mp = static_cast<int>(std::min<int64_t>(mp_max, wo - q0));
              FwdKernel(v, kb > 0, mp)(arow + q0 * sw * ci, sw * ci, view.row_stride,
                                       blk.rows_i, blk.m, wblk, m * ldw, ldw,
                                       yrow + q0 * co, co, mask);
            }
          }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConv2dWeightGrad, ConvWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConv2dForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right"));

// Whether this CPU can run the kernels (they use AVX-512F).
extern "C" __attribute__((visibility("default"))) int cnn_native_cpu_supported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }
