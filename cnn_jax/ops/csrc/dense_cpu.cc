// Native CPU kernels for the fully connected layer and its explicit backward
// (seed 003's backpropagation through an affine layer):
//
//   forward       Y  = X W          Y[m, n]  = sum_k X[m, k]  W[k, n]
//   input grad    dX = dY W^T       dX[m, k] = sum_n dY[m, n] W[k, n]
//   weight grad   dW = X^T dY       dW[k, n] = sum_m X[m, k]  dY[m, n]
//
// X is (M, K), W is (K, N) as flax stores a Dense kernel, Y and dY are (M, N);
// all float32, row-major. They are written for the shape class where XLA's CPU
// GEMMs lose most to the memory system: few rows (a batch of M examples) against
// a large weight matrix (VGG's 25088 x 4096 classifier layer is 411 MB, read
// or written once per product). Each kernel touches W exactly once, in an order
// the hardware prefetchers follow, and keeps the small operands in cache:
//
//   * forward: a worker owns a block of W's columns; it walks W's rows in
//     blocks, each block's panel read from memory once (rows as 2 KiB runs)
//     and multiplied by every row of X from MR x 64 register tiles of Y;
//   * input grad: a worker owns a block of W's rows (contiguous memory); a
//     KR x MR tile of dot products runs along N, each W row read once per
//     MR rows of dY, dY staying in L2;
//   * weight grad: a worker owns a block of dW's rows; each KR x 64 tile of dW
//     is summed over the M rows in registers and written once, with
//     non-temporal stores where the rows are 64-byte aligned (the output is
//     far larger than the caches, so reading it in before writing would only
//     double the traffic).
//
// Every output element is summed in a fixed order (set by the shapes, never
// by the threads), so results are reproducible run to run. Tails (N not a
// multiple of 16) never read past a buffer: the forward reads the last row of
// W under a mask, the weight grad reads a zero-padded copy of dY, the input
// grad's last vector along N is masked on both operands.
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

inline __mmask16 TailMask(int64_t width) {
  return static_cast<__mmask16>((1u << width) - 1u);
}

// ---------------------------------------------------------------------------
// Forward. A tile holds MR rows of Y x V vectors of columns and runs over kb
// rows of W: y[m][v] (+)= sum_r x[m, r] * w[r, 16 v ..], the block's sum
// formed in fresh registers and then added to y (LOAD), so the sum over K is
// two-level: its rounding error grows with kb + K / kb, not with K. `last` masks the
// tile's last vector on the stores (and on the loads of W when MASKW: only
// for W's final row, whose tail would otherwise be read past the buffer; the
// other rows' tails read into the next row, lanes that are never stored).
// ---------------------------------------------------------------------------
template <int MR, int V, bool LOAD, bool MASKW>
__attribute__((target("avx512f"))) void FwdTile(const float* x, int64_t ldx,
                                                 const float* w, int64_t ldw, int64_t kb,
                                                 float* y, int64_t ldy, __mmask16 last) {
  __m512 acc[MR][V];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      acc[m][v] = _mm512_setzero_ps();
  for (int64_t r = 0; r < kb; ++r) {
    const float* wr = w + r * ldw;
    __m512 wv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      wv[v] = MASKW && v == V - 1 ? _mm512_maskz_loadu_ps(last, wr + 16 * v)
                                  : _mm512_loadu_ps(wr + 16 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 a = _mm512_set1_ps(x[m * ldx + r]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[m][v] = _mm512_fmadd_ps(a, wv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __mmask16 mk = v == V - 1 ? last : 0xFFFF;
      float* yp = y + m * ldy + 16 * v;
      _mm512_mask_storeu_ps(
          yp, mk, LOAD ? _mm512_add_ps(_mm512_maskz_loadu_ps(mk, yp), acc[m][v]) : acc[m][v]);
    }
}

using FwdFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*,
                       int64_t, __mmask16);

constexpr int kFwdRows = 6;   // MR for V = 4: 24 accumulators

template <int V, bool LOAD, bool MASKW, int... M>
constexpr std::array<FwdFn, sizeof...(M)> FwdRow(std::integer_sequence<int, M...>) {
  return {&FwdTile<M + 1, V, LOAD, MASKW>...};
}

template <bool LOAD, bool MASKW>
struct FwdTable {
  static constexpr auto v1 = FwdRow<1, LOAD, MASKW>(std::make_integer_sequence<int, kFwdRows>{});
  static constexpr auto v2 = FwdRow<2, LOAD, MASKW>(std::make_integer_sequence<int, kFwdRows>{});
  static constexpr auto v3 = FwdRow<3, LOAD, MASKW>(std::make_integer_sequence<int, kFwdRows>{});
  static constexpr auto v4 = FwdRow<4, LOAD, MASKW>(std::make_integer_sequence<int, kFwdRows>{});
  static FwdFn Get(int v, int mr) {
    switch (v) {
      case 1: return v1[mr - 1];
      case 2: return v2[mr - 1];
      case 3: return v3[mr - 1];
      default: return v4[mr - 1];
    }
  }
};

FwdFn FwdKernel(int v, int mr, bool load, bool maskw) {
  if (load) return maskw ? FwdTable<true, true>::Get(v, mr) : FwdTable<true, false>::Get(v, mr);
  return maskw ? FwdTable<false, true>::Get(v, mr) : FwdTable<false, false>::Get(v, mr);
}

// Columns per work item (at most; fewer when N is small, so that every worker
// gets two items) and W rows per block of the forward. Each row of a block is
// read as one 2 KiB run (the L2 streamer follows it; 256-column items and
// 64-row blocks, 16 KiB apart, measured 1.7x slower on VGG's 25088 x 4096
// layer), and a block's panel (24 x 512 floats = 48 KiB) is reused from L1 by
// every row tile of X.
constexpr int64_t kFwdCols = 512;
constexpr int64_t kFwdKb = 24;

ffi::Error DenseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("cnn_dense_forward: expects x (M, K), w (K, N), y (M, N)");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  float* out = y->typed_data();
  if (m * n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(out, 0, m * n * sizeof(float));
    return ffi::Error::Success();
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const int workers = NumWorkers(pool);
  const int64_t cols = std::clamp<int64_t>((n + 2 * workers - 1) / (2 * workers) + 63 & ~int64_t{63},
                                           64, kFwdCols);
  const int64_t items = (n + cols - 1) / cols;
  ParallelFor(pool, items, workers, [&](int64_t item, int) {
    const int64_t c_lo = item * cols, c_hi = std::min(n, c_lo + cols);
    for (int64_t k0 = 0; k0 < k; k0 += kFwdKb) {
      const int64_t kb = std::min(kFwdKb, k - k0);
      for (int64_t c0 = c_lo; c0 < c_hi; c0 += 64) {
        const int64_t width = std::min<int64_t>(64, c_hi - c0);
        const int v = static_cast<int>((width + 15) / 16);
        const __mmask16 last = TailMask(width - 16 * (v - 1));
        // The tail vector of W's final row would be read past the buffer.
        const bool tail = width % 16 != 0 && k0 + kb == k;
        const int64_t body = tail ? kb - 1 : kb;
        for (int64_t m0 = 0; m0 < m; m0 += kFwdRows) {
          const int mr = static_cast<int>(std::min<int64_t>(kFwdRows, m - m0));
          const float* xa = xp + m0 * k + k0;
          const float* wa = wp + k0 * n + c0;
          float* ya = out + m0 * n + c0;
          if (body > 0) FwdKernel(v, mr, k0 > 0, false)(xa, k, wa, n, body, ya, n, last);
          if (tail)
            FwdKernel(v, mr, k0 > 0 || body > 0, true)(xa + body, k, wa + body * n, n, 1, ya, n, last);
        }
      }
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Input gradient. A tile holds KR rows of W x MR rows of dY as 16-lane partial
// dot products over N, reduced across lanes at the end:
// dx[m, k] = sum_n dy[m, n] * w[k, n].
// ---------------------------------------------------------------------------
template <int KR, int MR>
__attribute__((target("avx512f"))) void DxTile(const float* w, int64_t ldw,
                                                const float* dy, int64_t ldd, int64_t n,
                                                float* dx, int64_t ldx) {
  __m512 acc[KR][MR];
#pragma GCC unroll 4
  for (int kr = 0; kr < KR; ++kr)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) acc[kr][m] = _mm512_setzero_ps();
  const int64_t body = n / 16 * 16;
  for (int64_t c = 0; c < body; c += 16) {
    __m512 wv[KR];
#pragma GCC unroll 4
    for (int kr = 0; kr < KR; ++kr) wv[kr] = _mm512_loadu_ps(w + kr * ldw + c);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 d = _mm512_loadu_ps(dy + m * ldd + c);
#pragma GCC unroll 4
      for (int kr = 0; kr < KR; ++kr) acc[kr][m] = _mm512_fmadd_ps(wv[kr], d, acc[kr][m]);
    }
  }
  if (body < n) {   // the last partial vector, masked on both operands
    const __mmask16 last = TailMask(n - body);
    __m512 wv[KR];
#pragma GCC unroll 4
    for (int kr = 0; kr < KR; ++kr) wv[kr] = _mm512_maskz_loadu_ps(last, w + kr * ldw + body);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 d = _mm512_maskz_loadu_ps(last, dy + m * ldd + body);
#pragma GCC unroll 4
      for (int kr = 0; kr < KR; ++kr) acc[kr][m] = _mm512_fmadd_ps(wv[kr], d, acc[kr][m]);
    }
  }
#pragma GCC unroll 4
  for (int kr = 0; kr < KR; ++kr)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) dx[m * ldx + kr] = _mm512_reduce_add_ps(acc[kr][m]);
}

using DxFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

constexpr int kDxK = 3;   // KR x MR = 3 x 8 = 24 accumulators
constexpr int kDxM = 8;

template <int KR, int... M>
constexpr std::array<DxFn, sizeof...(M)> DxRow(std::integer_sequence<int, M...>) {
  return {&DxTile<KR, M + 1>...};
}

const std::array<DxFn, kDxM> kDx1 = DxRow<1>(std::make_integer_sequence<int, kDxM>{});
const std::array<DxFn, kDxM> kDx2 = DxRow<2>(std::make_integer_sequence<int, kDxM>{});
const std::array<DxFn, kDxM> kDx3 = DxRow<3>(std::make_integer_sequence<int, kDxM>{});

DxFn DxKernel(int kr, int mr) {
  return kr == 1 ? kDx1[mr - 1] : kr == 2 ? kDx2[mr - 1] : kDx3[mr - 1];
}

// W rows per work item of the input gradient.
constexpr int64_t kDxRowsPerItem = 48;

ffi::Error DenseInputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                          ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx) {
  auto dd = dy.dimensions();
  auto wd = w.dimensions();
  auto xd = dx->dimensions();
  if (dd.size() != 2 || wd.size() != 2 || xd.size() != 2 || dd[1] != wd[1] ||
      xd[0] != dd[0] || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("cnn_dense_input_grad: expects dy (M, N), w (K, N), dx (M, K)");
  }
  const int64_t m = dd[0], n = dd[1], k = wd[0];
  float* out = dx->typed_data();
  if (m * k == 0) return ffi::Error::Success();
  const float* dp = dy.typed_data();
  const float* wp = w.typed_data();
  const int64_t items = (k + kDxRowsPerItem - 1) / kDxRowsPerItem;
  ParallelFor(pool, items, NumWorkers(pool), [&](int64_t item, int) {
    const int64_t r_lo = item * kDxRowsPerItem, r_hi = std::min(k, r_lo + kDxRowsPerItem);
    for (int64_t k0 = r_lo; k0 < r_hi; k0 += kDxK) {
      const int kr = static_cast<int>(std::min<int64_t>(kDxK, r_hi - k0));
      for (int64_t m0 = 0; m0 < m; m0 += kDxM) {
        const int mr = static_cast<int>(std::min<int64_t>(kDxM, m - m0));
        DxKernel(kr, mr)(wp + k0 * n, n, dp + m0 * n, n, n, out + m0 * k + k0, k);
      }
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Weight gradient. A tile holds KR rows x V vectors of dW, summed over the M
// rows in registers and stored once: dw[k, 16 v ..] = sum_m x[m, k] dy[m, 16 v ..].
// dY rows hold whole vectors (the caller pads them). NT: streaming stores
// (full vectors, 64-byte aligned rows).
// ---------------------------------------------------------------------------
template <int KR, int V, bool NT>
__attribute__((target("avx512f"))) void DwTile(const float* x, int64_t ldx, int64_t m,
                                                const float* dy, int64_t ldd, float* dw,
                                                int64_t ldw, __mmask16 last) {
  __m512 acc[KR][V];
#pragma GCC unroll 8
  for (int kr = 0; kr < KR; ++kr)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[kr][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < m; ++i) {
    __m512 dv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) dv[v] = _mm512_loadu_ps(dy + i * ldd + 16 * v);
#pragma GCC unroll 8
    for (int kr = 0; kr < KR; ++kr) {
      const __m512 a = _mm512_set1_ps(x[i * ldx + kr]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[kr][v] = _mm512_fmadd_ps(a, dv[v], acc[kr][v]);
    }
  }
#pragma GCC unroll 8
  for (int kr = 0; kr < KR; ++kr)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      if (NT) {
        _mm512_stream_ps(dw + kr * ldw + 16 * v, acc[kr][v]);
      } else {
        _mm512_mask_storeu_ps(dw + kr * ldw + 16 * v, v == V - 1 ? last : 0xFFFF, acc[kr][v]);
      }
    }
}

using DwFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                      __mmask16);

constexpr int kDwK = 6;   // KR x V = 6 x 4 = 24 accumulators

template <int V, bool NT, int... K>
constexpr std::array<DwFn, sizeof...(K)> DwRow(std::integer_sequence<int, K...>) {
  return {&DwTile<K + 1, V, NT>...};
}

template <bool NT>
struct DwTable {
  static constexpr auto v1 = DwRow<1, NT>(std::make_integer_sequence<int, kDwK>{});
  static constexpr auto v2 = DwRow<2, NT>(std::make_integer_sequence<int, kDwK>{});
  static constexpr auto v3 = DwRow<3, NT>(std::make_integer_sequence<int, kDwK>{});
  static constexpr auto v4 = DwRow<4, NT>(std::make_integer_sequence<int, kDwK>{});
  static DwFn Get(int v, int kr) {
    switch (v) {
      case 1: return v1[kr - 1];
      case 2: return v2[kr - 1];
      case 3: return v3[kr - 1];
      default: return v4[kr - 1];
    }
  }
};

// dW rows per work item, and per group whose tiles share each 64-column
// block of dY from L1.
constexpr int64_t kDwRowsPerItem = 48;
constexpr int64_t kDwGroup = 12;

ffi::Error DenseWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions();
  auto dd = dy.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 2 || dd.size() != 2 || wd.size() != 2 || xd[0] != dd[0] ||
      wd[0] != xd[1] || wd[1] != dd[1]) {
    return ffi::Error::InvalidArgument("cnn_dense_weight_grad: expects x (M, K), dy (M, N), dw (K, N)");
  }
  const int64_t m = xd[0], k = xd[1], n = dd[1];
  float* out = dw->typed_data();
  if (k * n == 0) return ffi::Error::Success();
  if (m == 0) {
    std::memset(out, 0, k * n * sizeof(float));
    return ffi::Error::Success();
  }
  const float* xp = x.typed_data();
  // dY rows padded to whole vectors when N is not a multiple of 16 (the tiles
  // read full vectors; the extra lanes are never stored).
  const int64_t ldd = (n + 15) / 16 * 16;
  const float* dp = dy.typed_data();
  std::vector<float> dy_pad;
  if (ldd != n) {
    dy_pad.assign(m * ldd, 0.0f);
    for (int64_t i = 0; i < m; ++i) std::memcpy(dy_pad.data() + i * ldd, dp + i * n, n * sizeof(float));
    dp = dy_pad.data();
  }
  const bool nt = n % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  const int64_t items = (k + kDwRowsPerItem - 1) / kDwRowsPerItem;
  ParallelFor(pool, items, NumWorkers(pool), [&](int64_t item, int) {
    const int64_t r_lo = item * kDwRowsPerItem, r_hi = std::min(k, r_lo + kDwRowsPerItem);
    for (int64_t g0 = r_lo; g0 < r_hi; g0 += kDwGroup) {
      const int64_t g1 = std::min(r_hi, g0 + kDwGroup);
      for (int64_t c0 = 0; c0 < n; c0 += 64) {
        const int64_t width = std::min<int64_t>(64, n - c0);
        const int v = static_cast<int>((width + 15) / 16);
        const __mmask16 last = TailMask(width - 16 * (v - 1));
        for (int64_t k0 = g0; k0 < g1; k0 += kDwK) {
          const int kr = static_cast<int>(std::min<int64_t>(kDwK, g1 - k0));
          const DwFn fn = nt ? DwTable<true>::Get(v, kr) : DwTable<false>::Get(v, kr);
          fn(xp + k0, k, m, dp + c0, ldd, out + k0 * n + c0, n, last);
        }
      }
    }
    if (nt) _mm_sfence();   // streaming stores visible before the item counts as done
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnDenseForward, DenseForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnDenseInputGrad, DenseInputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnDenseWeightGrad, DenseWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
