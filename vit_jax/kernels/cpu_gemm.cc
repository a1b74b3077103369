// vit_gemm: float32 C = op(A) @ op(B) through a CBLAS sgemm, as an XLA FFI custom call on the CPU.
//
// Each operand is a batch of row-major matrices in one of two layouts: plain, [..., rows, cols]
// (B may also be one [rows, cols] matrix for every batch), or, when its attribute heads_a /
// heads_b / heads_c is H > 0, attention's [batch, rows, H, cols], where matrix (b, h) starts at
// b * rows * H * cols + h * cols with a row stride of H * cols; the products then run over
// batch * H matrices, so attention needs no copies into a heads-major layout. op transposes a
// matrix when trans_a / trans_b is set. Each product is split into row blocks (column blocks
// when it has fewer rows than columns) or, with at least one product per thread, one task per
// product, run on XLA's own intra-op thread pool with a single-threaded BLAS in each task, so no
// second thread pool competes with XLA's for the cores. The split depends only on the shapes and
// the pool's size, so results are the same from run to run.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm32 = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                         const float*, int64_t, float, float*, int64_t);
using SetThreads = void (*)(int);

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int64_t kMinBlock = 64;  // rows (or columns) per task at least

void* g_sgemm = nullptr;
bool g_ilp64 = false;
SetThreads g_set_local_threads = nullptr;

void Sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
           const float* b, int64_t ldb, float* c, int64_t ldc) {
  // Checked on every call: some OpenBLAS builds keep one count for the whole process, which
  // other code (numpy, threadpoolctl) may raise again.
  if (g_set_local_threads != nullptr) g_set_local_threads(1);
  int op_a = ta ? kTrans : kNoTrans, op_b = tb ? kTrans : kNoTrans;
  if (g_ilp64) {
    reinterpret_cast<Sgemm64>(g_sgemm)(kRowMajor, op_a, op_b, m, n, k, 1.0f, a, lda, b, ldb, 0.0f,
                                       c, ldc);
  } else {
    reinterpret_cast<Sgemm32>(g_sgemm)(kRowMajor, op_a, op_b, static_cast<int>(m),
                                       static_cast<int>(n), static_cast<int>(k), 1.0f, a,
                                       static_cast<int>(lda), b, static_cast<int>(ldb), 0.0f, c,
                                       static_cast<int>(ldc));
  }
}

// Tasks take block indices from a shared counter; the calling thread works too, so the call
// finishes even when every other pool thread is busy.
struct Blocks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t count = 0;
  std::mutex mu;
  std::condition_variable finished;
};

// One operand: where matrix i starts, its row stride, its rows and columns (as stored).
struct Operand {
  const float* data;
  int64_t rows, cols, heads, count;  // count: matrices stored (1: one shared by every batch)
  int64_t Offset(int64_t i) const {
    if (count == 1) return 0;
    if (heads > 0) return (i / heads) * rows * heads * cols + (i % heads) * cols;
    return i * rows * cols;
  }
  int64_t Stride() const { return heads > 0 ? heads * cols : cols; }
};

// The matrices of a buffer of dimensions dims in the layout given by heads (see the top).
Operand Layout(const float* data, ffi::Span<const int64_t> dims, int64_t heads) {
  const size_t r = dims.size();
  if (heads > 0) return {data, dims[1], dims[3], heads, dims[0] * heads};
  int64_t count = 1;
  for (size_t i = 0; i + 2 < r; ++i) count *= dims[i];
  return {data, dims[r - 2], dims[r - 1], 0, count};
}

ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a_buf, ffi::Buffer<ffi::F32> b_buf,
                ffi::ResultBuffer<ffi::F32> c_buf, bool trans_a, bool trans_b, int64_t heads_a,
                int64_t heads_b, int64_t heads_c) {
  if (g_sgemm == nullptr) {
    return ffi::Error::InvalidArgument("vit_gemm: no BLAS library loaded (vit_jax.kernels)");
  }
  auto ad = a_buf.dimensions(), bd = b_buf.dimensions(), cd = c_buf->dimensions();
  for (auto [dims, heads] : {std::pair{ad, heads_a}, std::pair{bd, heads_b}, std::pair{cd, heads_c}}) {
    if (dims.size() < 2 || (heads > 0 && (dims.size() != 4 || dims[2] != heads))) {
      return ffi::Error::InvalidArgument("vit_gemm: an operand is neither [..., rows, cols] nor "
                                         "[batch, rows, heads, cols]");
    }
  }
  const Operand a = Layout(a_buf.typed_data(), ad, heads_a);
  const Operand b = Layout(b_buf.typed_data(), bd, heads_b);
  Operand c = Layout(c_buf->typed_data(), cd, heads_c);
  const int64_t m = trans_a ? a.cols : a.rows, k = trans_a ? a.rows : a.cols;
  const int64_t n = trans_b ? b.rows : b.cols;
  const int64_t batch = c.count;
  if ((trans_b ? b.cols : b.rows) != k || c.rows != m || c.cols != n || a.count != batch ||
      (b.count != batch && b.count != 1)) {
    return ffi::Error::InvalidArgument("vit_gemm: operand shapes do not match");
  }
  float* const cp = c_buf->typed_data();

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool by_rows = m >= n;
  const int64_t extent = by_rows ? m : n;
  int64_t parts = batch >= threads ? 1 : threads;
  if (extent < kMinBlock * parts) parts = std::max<int64_t>(1, extent / kMinBlock);
  const int64_t per = (extent + parts - 1) / parts;

  auto run = [=](int64_t index) {
    const int64_t i = index / parts, lo = (index % parts) * per;
    const int64_t hi = std::min(extent, lo + per);
    if (lo >= hi) return;
    const int64_t lda = a.Stride(), ldb = b.Stride(), ldc = c.Stride();
    const float* A = a.data + a.Offset(i);
    const float* B = b.data + b.Offset(i);
    float* C = cp + c.Offset(i);
    if (by_rows) {  // rows lo..hi of op(A) and of C
      Sgemm(trans_a, trans_b, hi - lo, n, k, trans_a ? A + lo : A + lo * lda, lda, B, ldb,
            C + lo * ldc, ldc);
    } else {  // columns lo..hi of op(B) and of C
      Sgemm(trans_a, trans_b, m, hi - lo, k, A, lda, trans_b ? B + lo * ldb : B + lo, ldb, C + lo,
            ldc);
    }
  };
  auto blocks = std::make_shared<Blocks>();
  blocks->count = batch * parts;
  auto work = [blocks, run]() {
    for (int64_t i = blocks->next.fetch_add(1); i < blocks->count; i = blocks->next.fetch_add(1)) {
      run(i);
      if (blocks->done.fetch_add(1) + 1 == blocks->count) {
        std::lock_guard<std::mutex> lock(blocks->mu);
        blocks->finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min(threads, blocks->count) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(blocks->mu);
  blocks->finished.wait(lock, [&] { return blocks->done.load() == blocks->count; });
  return ffi::Error::Success();
}

}  // namespace

// Called once from Python (ctypes) with the library's sgemm: CBLAS argument order, 32-bit
// integers unless ilp64; set_local_threads (may be null) is called with 1 before each product.
extern "C" void vit_gemm_set_blas(void* sgemm, int ilp64, void* set_local_threads) {
  g_sgemm = sgemm;
  g_ilp64 = ilp64 != 0;
  g_set_local_threads = reinterpret_cast<SetThreads>(set_local_threads);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<int64_t>("heads_a")
                                  .Attr<int64_t>("heads_b")
                                  .Attr<int64_t>("heads_c"));
