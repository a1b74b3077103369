// Batched float32 matmul for XLA's CPU backend, as an XLA FFI custom call.
//
// C[i] = op(A[i]) op(B[i]) for i < batch, op() an optional transpose of the last two axes.
// XLA's own CPU kernel runs a batch of small matrices (attention's [batch * heads, 197, 64]) on
// one thread; here single-threaded BLAS sgemm calls run on XLA's intra-op thread pool, split
// over the batch (or, for a single matrix, over row blocks of C), so the cores are shared with
// the rest of the computation rather than with a second thread pool. The sgemm comes from the
// BLAS library that vit_jax/kernels/cpu_matmul.py loads and passes in with vit_jax_set_sgemm().

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm with 64-bit integers (ILP64).
using SgemmFn = void (*)(int layout, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                         float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float beta, float* c, int64_t ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
SgemmFn sgemm = nullptr;

// A single matrix is split into row blocks of at least this many rows.
constexpr int64_t kMinRowsPerBlock = 128;

struct Job {
  const float* a;
  const float* b;
  float* c;
  int64_t batch, m, n, k;
  bool trans_a, trans_b;
  int64_t num_tasks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Rows [row0, row0 + rows) of C[i].
  void Rows(int64_t i, int64_t row0, int64_t rows) const {
    const float* a_i = a + i * m * k;
    const float* a_rows = trans_a ? a_i + row0 : a_i + row0 * k;  // A[i] is [k, m] or [m, k]
    sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, rows, n, k, 1.0f,
          a_rows, trans_a ? m : k, b + i * k * n, trans_b ? k : n, 0.0f,
          c + i * m * n + row0 * n, n);
  }

  void Task(int64_t t) const {
    if (batch == 1) {
      int64_t rows = (m + num_tasks - 1) / num_tasks;
      int64_t row0 = t * rows;
      if (row0 < m) Rows(0, row0, std::min(rows, m - row0));
      return;
    }
    for (int64_t i = batch * t / num_tasks; i < batch * (t + 1) / num_tasks; ++i) Rows(i, 0, m);
  }

  // Runs tasks until none are left. A pool thread that starts after the caller took the last task
  // returns at once, so the caller only ever waits for tasks that are running: no deadlock even
  // when every pool thread is inside this function.
  void Drain() {
    for (int64_t t; (t = next.fetch_add(1)) < num_tasks;) {
      Task(t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                  ffi::Result<ffi::AnyBuffer> c, bool trans_a, bool trans_b) {
  if (sgemm == nullptr) {
    return ffi::Error::Internal("vit_jax_cpu_matmul: no BLAS sgemm was set");
  }
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("vit_jax_cpu_matmul: operands must be float32");
  }
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != bd.size() || ad.size() < 2) {
    return ffi::Error::InvalidArgument("vit_jax_cpu_matmul: operands need the same rank, >= 2");
  }
  size_t r = ad.size();
  auto job = std::make_shared<Job>();
  job->batch = 1;
  for (size_t i = 0; i + 2 < r; ++i) {
    if (ad[i] != bd[i]) return ffi::Error::InvalidArgument("vit_jax_cpu_matmul: batch axes differ");
    job->batch *= ad[i];
  }
  job->trans_a = trans_a;
  job->trans_b = trans_b;
  job->m = trans_a ? ad[r - 1] : ad[r - 2];
  job->k = trans_a ? ad[r - 2] : ad[r - 1];
  job->n = trans_b ? bd[r - 2] : bd[r - 1];
  if ((trans_b ? bd[r - 1] : bd[r - 2]) != job->k) {
    return ffi::Error::InvalidArgument("vit_jax_cpu_matmul: contracting axes differ");
  }
  job->a = static_cast<const float*>(a.untyped_data());
  job->b = static_cast<const float*>(b.untyped_data());
  job->c = static_cast<float*>(c->untyped_data());
  if (job->batch == 0 || job->m == 0 || job->n == 0) return ffi::Error::Success();
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t parts = job->batch == 1 ? job->m / kMinRowsPerBlock : job->batch;
  job->num_tasks = std::max<int64_t>(1, std::min(threads, parts));
  for (int64_t t = 1; t < job->num_tasks; ++t) pool.Schedule([job] { job->Drain(); });
  job->Drain();
  while (job->done.load(std::memory_order_acquire) < job->num_tasks) {
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitJaxCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

extern "C" void vit_jax_set_sgemm(void* fn) { sgemm = reinterpret_cast<SgemmFn>(fn); }
