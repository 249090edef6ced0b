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
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------
// Work sharing on XLA's pool: the caller takes part, so a busy pool only costs
// parallelism, never progress (a task that starts after all items are claimed
// returns without touching the caller's data).
// ---------------------------------------------------------------------------
struct SharedWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> workers{0};
  int64_t count = 0;
  std::function<void(int64_t item, int worker)> fn;
};

void RunItems(SharedWork* w) {
  int worker = -1;
  for (;;) {
    int64_t item = w->next.fetch_add(1, std::memory_order_relaxed);
    if (item >= w->count) return;
    if (worker < 0) worker = w->workers.fetch_add(1, std::memory_order_relaxed);
    w->fn(item, worker);
    w->done.fetch_add(1, std::memory_order_release);
  }
}

// Runs fn(item, worker) for item in [0, count); worker ids are < max_workers.
void ParallelFor(ffi::ThreadPool& pool, int64_t count, int max_workers,
                 std::function<void(int64_t, int)> fn) {
  auto work = std::make_shared<SharedWork>();
  work->count = count;
  work->fn = std::move(fn);
  int helpers = std::min<int64_t>(max_workers - 1, count - 1);
  for (int t = 0; t < helpers; ++t) {
    pool.Schedule([work]() { RunItems(work.get()); });
  }
  RunItems(work.get());
  while (work->done.load(std::memory_order_acquire) < count) {
    std::this_thread::yield();
  }
}

int NumWorkers(ffi::ThreadPool& pool) {
  int64_t n = pool.num_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, 64)));
}

// A zero-padded copy of an NHWC tensor, or null when every pad is zero.
std::unique_ptr<float[]> PadNHWC(ffi::ThreadPool& pool, int workers, const float* src,
                                 int64_t n, int64_t h, int64_t w, int64_t c, int64_t pt,
                                 int64_t pb, int64_t pl, int64_t pr) {
  if (!(pt || pb || pl || pr)) return nullptr;
  const int64_t hp = h + pt + pb, wp = w + pl + pr;
  std::unique_ptr<float[]> padded(new float[n * hp * wp * c]);
  float* dst = padded.get();
  const int64_t row_in = w * c, row_out = wp * c;
  ParallelFor(pool, n, workers, [&](int64_t nn, int) {
    float* img = dst + nn * hp * row_out;
    std::memset(img, 0, pt * row_out * sizeof(float));
    for (int64_t hh = 0; hh < h; ++hh) {
      float* d = img + (pt + hh) * row_out;
      std::memset(d, 0, pl * c * sizeof(float));
      std::memcpy(d + pl * c, src + (nn * h + hh) * row_in, row_in * sizeof(float));
      std::memset(d + pl * c + row_in, 0, pr * c * sizeof(float));
    }
    std::memset(img + (pt + h) * row_out, 0, pb * row_out * sizeof(float));
  });
  return padded;
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

// acc (MR x V vectors) is loaded from c and stored back: the caller zeroes c
// first where the tile starts a sum. GCC keeps the accumulators in registers
// only when the loop body has no select on them and no masked loads (either
// made it spill all of them every position), hence the separate TAIL variant
// for a last vector narrower than 16 outputs.
template <int MR, int V, bool TAIL>
__attribute__((target("avx512f"))) void MicroTile(const Rows& r, float* c,
                                                   int64_t ldc, __mmask16 tail) {
  __m512 acc[MR][V];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v)
      acc[m][v] = _mm512_maskz_loadu_ps(v == V - 1 ? tail : 0xFFFF, c + m * ldc + 16 * v);
  // One flat loop with a per-position offset table: with a nested loop over
  // rows GCC stored and reloaded every accumulator once per row.
  const float* b = r.b0;
  const int64_t b_col = r.b_col;
  for (int64_t t = 0; t < r.count; ++t) {
    const float* a = r.a0 + r.a_off[t];
    __m512 bv[V];
    for (int v = 0; v < V; ++v)
      bv[v] = (TAIL && v == V - 1) ? _mm512_maskz_loadu_ps(tail, b + 16 * v)
                                   : _mm512_loadu_ps(b + 16 * v);
    for (int m = 0; m < MR; ++m) {
      __m512 av = _mm512_set1_ps(a[m]);
      for (int v = 0; v < V; ++v) acc[m][v] = _mm512_fmadd_ps(av, bv[v], acc[m][v]);
    }
    b += b_col;
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(c + m * ldc + 16 * v, v == V - 1 ? tail : 0xFFFF, acc[m][v]);
}

using TileFn = void (*)(const Rows&, float*, int64_t, __mmask16);

template <int V, bool TAIL, int... M>
constexpr std::array<TileFn, sizeof...(M)> MakeTable(std::integer_sequence<int, M...>) {
  return {&MicroTile<M + 1, V, TAIL>...};
}

// Row counts per tile: V = 2 (32 outputs) keeps 12 x 2 accumulators, V = 1
// keeps 24; both leave registers for the dY vectors and the broadcast.
constexpr int kMaxRows1 = 24;
constexpr int kMaxRows2 = 12;
const auto kTiles1 = MakeTable<1, false>(std::make_integer_sequence<int, kMaxRows1>{});
const auto kTiles2 = MakeTable<2, false>(std::make_integer_sequence<int, kMaxRows2>{});
const auto kTiles1Tail = MakeTable<1, true>(std::make_integer_sequence<int, kMaxRows1>{});
const auto kTiles2Tail = MakeTable<2, true>(std::make_integer_sequence<int, kMaxRows2>{});

struct DwProblem {
  int64_t n, h, w, ci, ho, wo, co, kh, kw, sh, sw;
  int64_t hp, wp;          // padded input
  const float* xpad;       // (n, hp, wp, ci)
  const float* dy;         // (n, ho, wo, co)
  int64_t m;               // kw * ci: rows of dW per kernel row
  int64_t chunk_rows;      // output rows per chunk
  int64_t chunks;
};

// dW rows [r_lo, r_hi) of every kernel row, summed over the chunks [k_lo, k_hi),
// into c (kh, m, co): added to what c holds, or written over it (zeroed first)
// when `overwrite`.
void DwBlock(const DwProblem& p, int64_t k_lo, int64_t k_hi, int64_t r_lo,
             int64_t r_hi, float* c, bool overwrite) {
  const int v_count = p.co > 16 ? 2 : 1;
  const int max_rows = v_count == 2 ? kMaxRows2 : kMaxRows1;
  const int64_t co_step = 16 * v_count;
  if (overwrite) {
    for (int64_t i = 0; i < p.kh; ++i)
      std::memset(c + (i * p.m + r_lo) * p.co, 0, (r_hi - r_lo) * p.co * sizeof(float));
  }
  std::vector<int64_t> a_off(p.chunk_rows * p.wo);
  for (int64_t k = k_lo; k < k_hi; ++k) {
    const int64_t g0 = k * p.chunk_rows;
    const int64_t g1 = std::min(g0 + p.chunk_rows, p.n * p.ho);
    const int64_t count = (g1 - g0) * p.wo;
    for (int64_t i = 0; i < p.kh; ++i) {
      // Offsets of each position's Xpad start (kernel row i) from the chunk's first.
      const int64_t base_n = g0 / p.ho, base_p = g0 % p.ho;
      const int64_t base = ((base_n * p.hp + base_p * p.sh + i) * p.wp) * p.ci;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t nn = g / p.ho, pp = g % p.ho;
        const int64_t row = ((nn * p.hp + pp * p.sh + i) * p.wp) * p.ci - base;
        for (int64_t q = 0; q < p.wo; ++q) a_off[(g - g0) * p.wo + q] = row + q * p.sw * p.ci;
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
          const __mmask16 tail = static_cast<__mmask16>((1u << last) - 1u);
          const bool partial = last < 16;
          Rows rows{p.xpad + base + r0, a_off.data(), p.dy + g0 * p.wo * p.co + o0,
                    count, p.co};
          float* tile = c + (i * p.m + r0) * p.co + o0;
          if (v == 2) {
            (partial ? kTiles2Tail : kTiles2)[mr - 1](rows, tile, p.co, tail);
          } else {
            (partial ? kTiles1Tail : kTiles1)[mr - 1](rows, tile, p.co, tail);
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
  p.n = xd[0]; p.h = xd[1]; p.w = xd[2]; p.ci = xd[3];
  p.ho = yd[1]; p.wo = yd[2]; p.co = yd[3];
  p.kh = kh; p.kw = kw; p.sh = sh; p.sw = sw;
  if (yd[0] != p.n || wd[0] != kh || wd[1] != kw || wd[2] != p.ci || wd[3] != p.co ||
      pad_top < 0 || pad_bottom < 0 || pad_left < 0 || pad_right < 0 || sh < 1 || sw < 1) {
    return ffi::Error::InvalidArgument("cnn_conv2d_weight_grad: inconsistent shapes or attributes");
  }
  p.hp = p.h + pad_top + pad_bottom;
  p.wp = p.w + pad_left + pad_right;
  if ((p.ho - 1) * sh + kh > p.hp || (p.wo - 1) * sw + kw > p.wp) {
    return ffi::Error::InvalidArgument("cnn_conv2d_weight_grad: output larger than the padded input allows");
  }
  p.m = kw * p.ci;
  float* out = dw->typed_data();
  const int64_t out_size = kh * p.m * p.co;
  if (p.n * p.ho * p.wo == 0) {
    std::memset(out, 0, out_size * sizeof(float));
    return ffi::Error::Success();
  }
  const int workers = NumWorkers(pool);

  // Zero-padded copy of X (none when the padding is zero).
  std::unique_ptr<float[]> padded = PadNHWC(pool, workers, x.typed_data(), p.n, p.h, p.w,
                                            p.ci, pad_top, pad_bottom, pad_left, pad_right);
  p.xpad = padded ? padded.get() : x.typed_data();
  p.dy = dy.typed_data();

  // Chunks of whole output rows, ~512 KiB of Xpad rows and dY rows each.
  const int64_t row_bytes = (p.sh * p.wp * p.ci + p.wo * p.co) * 4;
  const int64_t total_rows = p.n * p.ho;
  p.chunk_rows = std::max<int64_t>(1, std::min<int64_t>(total_rows, (512 << 10) / std::max<int64_t>(row_bytes, 1)));
  p.chunks = (total_rows + p.chunk_rows - 1) / p.chunk_rows;

  const int64_t dw_bytes = out_size * 4;
  if (dw_bytes <= (512 << 10) || workers == 1) {
    // Split positions: at least 2 chunks per worker for balance.
    if (workers > 1 && p.chunks < 2 * workers) {
      p.chunk_rows = std::max<int64_t>(1, (total_rows + 2 * workers - 1) / (2 * workers));
      p.chunks = (total_rows + p.chunk_rows - 1) / p.chunk_rows;
    }
    // Fixed groups of consecutive chunks, each summed in order into its own
    // partial dW, then the partials summed in order: the result does not
    // depend on which thread ran which group (training stays bit-for-bit
    // reproducible, e.g. across a checkpoint resume).
    const int64_t parts = std::min<int64_t>(p.chunks, std::max<int64_t>(4, 2 * workers));
    std::unique_ptr<float[]> partial(new float[parts * out_size]);
    ParallelFor(pool, parts, workers, [&](int64_t part, int) {
      const int64_t k_lo = part * p.chunks / parts, k_hi = (part + 1) * p.chunks / parts;
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
      if (r_lo < r_hi) DwBlock(p, 0, p.chunks, r_lo, r_hi, out, true);
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
// accumulators made GCC spill them.
template <int MP, int V, bool TAIL, bool LOAD>
__attribute__((target("avx512f"))) void FwdTile(const float* a, int64_t a_step,
                                                 int64_t a_krow, int64_t rows_i,
                                                 int64_t m, const float* w, int64_t w_krow,
                                                 int64_t ldw, float* y, int64_t ldy,
                                                 __mmask16 tail) {
  __m512 acc[MP][V];
  for (int mm = 0; mm < MP; ++mm)
    for (int v = 0; v < V; ++v)
      acc[mm][v] = LOAD ? _mm512_maskz_loadu_ps(v == V - 1 ? tail : 0xFFFF, y + mm * ldy + 16 * v)
                        : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows_i; ++i) {
    const float* ai = a + i * a_krow;
    const float* wi = w + i * w_krow;
    for (int64_t r = 0; r < m; ++r) {
      __m512 wv[V];
      for (int v = 0; v < V; ++v)
        wv[v] = (TAIL && v == V - 1) ? _mm512_maskz_loadu_ps(tail, wi + r * ldw + 16 * v)
                                     : _mm512_loadu_ps(wi + r * ldw + 16 * v);
      for (int mm = 0; mm < MP; ++mm) {
        __m512 av = _mm512_set1_ps(ai[mm * a_step + r]);
        for (int v = 0; v < V; ++v) acc[mm][v] = _mm512_fmadd_ps(av, wv[v], acc[mm][v]);
      }
    }
  }
  for (int mm = 0; mm < MP; ++mm)
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(y + mm * ldy + 16 * v, v == V - 1 ? tail : 0xFFFF, acc[mm][v]);
}

using FwdFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, const float*,
                       int64_t, int64_t, float*, int64_t, __mmask16);

template <int V, bool TAIL, bool LOAD, int... M>
constexpr std::array<FwdFn, sizeof...(M)> MakeFwdTable(std::integer_sequence<int, M...>) {
  return {&FwdTile<M + 1, V, TAIL, LOAD>...};
}

// Positions per tile for V output vectors: MP * V accumulators <= 24.
constexpr int kFwdPositions[5] = {0, 16, 12, 8, 6};

template <bool TAIL, bool LOAD>
struct FwdTables {
  static constexpr auto t1 = MakeFwdTable<1, TAIL, LOAD>(std::make_integer_sequence<int, 16>{});
  static constexpr auto t2 = MakeFwdTable<2, TAIL, LOAD>(std::make_integer_sequence<int, 12>{});
  static constexpr auto t3 = MakeFwdTable<3, TAIL, LOAD>(std::make_integer_sequence<int, 8>{});
  static constexpr auto t4 = MakeFwdTable<4, TAIL, LOAD>(std::make_integer_sequence<int, 6>{});
  static FwdFn Get(int v, int mp) {
    switch (v) {
      case 1: return t1[mp - 1];
      case 2: return t2[mp - 1];
      case 3: return t3[mp - 1];
      default: return t4[mp - 1];
    }
  }
};

FwdFn FwdKernel(int v, bool tail, bool load, int mp) {
  if (tail) return load ? FwdTables<true, true>::Get(v, mp) : FwdTables<true, false>::Get(v, mp);
  return load ? FwdTables<false, true>::Get(v, mp) : FwdTables<false, false>::Get(v, mp);
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
  std::unique_ptr<float[]> padded = PadNHWC(pool, workers, x.typed_data(), n, h, wi, ci,
                                            pad_top, pad_bottom, pad_left, pad_right);
  const float* xpad = padded ? padded.get() : x.typed_data();
  const float* wt = w.typed_data();
  const int64_t m = kw * ci;

  // Output-channel blocks of up to 64 (4 vectors); rows in chunks of ~256 KiB
  // of Xpad; one item = (chunk, block).
  const int64_t block = std::min<int64_t>(64, ((co + 15) / 16) * 16);
  const int64_t blocks = (co + block - 1) / block;
  const int64_t total_rows = n * ho;
  const int64_t row_bytes = std::max<int64_t>(1, (sh + kh) * wp * ci * 4);
  int64_t chunk_rows = std::max<int64_t>(1, std::min<int64_t>(total_rows, (256 << 10) / row_bytes));
  if (workers > 1 && ((total_rows + chunk_rows - 1) / chunk_rows) * blocks < 4 * workers) {
    chunk_rows = std::max<int64_t>(1, (total_rows * blocks + 4 * workers - 1) / (4 * workers));
  }
  const int64_t chunks = (total_rows + chunk_rows - 1) / chunk_rows;
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
  ParallelFor(pool, chunks * blocks, workers, [&](int64_t item, int) {
    const int64_t k = item / blocks, b = item % blocks;
    const int64_t o0 = b * block;
    const int64_t width = std::min(block, co - o0);
    const int v = static_cast<int>((width + 15) / 16);
    const int64_t last = width - 16 * (v - 1);
    const bool tail = last < 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << last) - 1u);
    const int mp_max = kFwdPositions[v];
    const int64_t g1 = std::min(total_rows, (k + 1) * chunk_rows);
    for (size_t kb = 0; kb < kblocks.size(); ++kb) {
      const KBlock& blk = kblocks[kb];
      const float* wblk = wt + (blk.i0 * m + blk.r0) * co + o0;
      for (int64_t g = k * chunk_rows; g < g1; ++g) {
        const int64_t nn = g / ho, pp = g % ho;
        const float* arow = xpad + ((nn * hp + pp * sh + blk.i0) * wp) * ci + blk.r0;
        float* yrow = out + g * wo * co + o0;
        for (int64_t q0 = 0; q0 < wo; q0 += mp_max) {
          const int mp = static_cast<int>(std::min<int64_t>(mp_max, wo - q0));
          FwdKernel(v, tail, kb > 0, mp)(arow + q0 * sw * ci, sw * ci, wp * ci, blk.rows_i,
                                         blk.m, wblk, m * co, co, yrow + q0 * co, co, mask);
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
