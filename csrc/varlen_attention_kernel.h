// Varlen attention with the learned per-modality relative-position bias: the one kernel
// source, compiled once per CPU capability (see varlen_attention.h). Include it only after
// defining CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and the matching CPU_CAPABILITY_* macro.
//
// Semantics (omni_core/ops/attention.py): q, k, v [T, H, Dh]; sequence b is the tokens
// cu_seqlens[b] .. cu_seqlens[b+1]; logit(i, j) = scale * q_i . k_j, plus
// table[lut[m, pos_i, pos_j], h] when modality_i == modality_j == m and the entry is >= 0.
//
// Forward: FlashAttention-2's blocked online softmax. One work item is (sequence, head,
// query block); it walks the key blocks keeping a running row max m, row sum l and an
// unnormalised output, so no [L, L] logit, bias or mask is ever materialised. It saves
// lse = m + log(l) per (token, head) for the backward.
//
// Backward: one work item is (sequence, head); it walks key blocks, and for each key block
// every query block, recomputing P = exp(S - lse) from the saved lse:
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
//   dQ += scale dS K,  dK += scale dS^T Q,  dtable[lut entry, h] += dS (biased pairs).
// A work item owns its rows of dQ, dK, dV (no atomics); dtable, shared by all sequences, is
// accumulated in one private copy per thread and summed at the end.
//
// Matmuls go to BLAS (sgemm/dgemm) on strided views of the packed tensors (no copies);
// the row-wise softmax work is vectorised with at::vec. Work items are handed out longest
// first from a shared counter, so one long audio clip does not leave a core idle at the end.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "varlen_attention.h"

namespace omni::attention::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                      const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C. Column-major BLAS sees every row-major
// matrix transposed, so it is asked for C^T = op(B)^T op(A)^T: operands swap, flags stay.
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                 int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  blas_gemm(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M),
            static_cast<int>(K), alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda), beta, C,
            static_cast<int>(ldc));
}

// The layout every work item reads, as raw pointers.
template <typename T>
struct View {
  const T *q, *k, *v;
  const int32_t* cu;
  int64_t H, Dh, ld;  // ld: elements between consecutive tokens (H * Dh)
  T scale;
  const T* table;  // nullptr: no bias
  const int32_t *lut, *modality, *position;
  int64_t P;

  explicit View(const Args& a)
      : q(a.q.data_ptr<T>()), k(a.k.data_ptr<T>()), v(a.v.data_ptr<T>()),
        cu(a.cu_seqlens.data_ptr<int32_t>()), H(a.q.size(1)), Dh(a.q.size(2)), ld(H * Dh),
        scale(static_cast<T>(a.scale)), table(a.table.defined() ? a.table.data_ptr<T>() : nullptr),
        lut(table ? a.lut.data_ptr<int32_t>() : nullptr),
        modality(table ? a.modality.data_ptr<int32_t>() : nullptr),
        position(table ? a.position.data_ptr<int32_t>() : nullptr), P(table ? a.lut.size(1) : 0) {}

  // The bias_table row of (query token tq, key token tk), or -1 when the pair gets none.
  int64_t bias_entry(int64_t tq, int64_t tk) const {
    const int32_t m = modality[tq];
    if (modality[tk] != m) return -1;
    return lut[(static_cast<int64_t>(m) * P + position[tq]) * P + position[tk]];
  }
};

// Logits s[nq, nk] (already scaled by the GEMM) += the bias of head h.
template <typename T>
void add_bias(const View<T>& w, T* s, int64_t tq0, int64_t nq, int64_t tk0, int64_t nk, int64_t h) {
  for (int64_t i = 0; i < nq; ++i) {
    T* row = s + i * nk;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t e = w.bias_entry(tq0 + i, tk0 + j);
      if (e >= 0) row[j] += w.table[e * w.H + h];
    }
  }
}

// dtable[entry, h] += ds[i, j] over the biased pairs of the block.
template <typename T>
void accumulate_dbias(const View<T>& w, const T* ds, T* dtable, int64_t tq0, int64_t nq, int64_t tk0,
                      int64_t nk, int64_t h) {
  for (int64_t i = 0; i < nq; ++i) {
    const T* row = ds + i * nk;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t e = w.bias_entry(tq0 + i, tk0 + j);
      if (e >= 0) dtable[e * w.H + h] += row[j];
    }
  }
}

template <typename T>
T row_max(const T* row, int64_t n) {
  return at::vec::reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return at::vec::maximum(a, b); },
                                row, n);
}

// row = exp(row - shift); returns the sum of the new row.
template <typename T>
T exp_shifted(T* row, int64_t n, T shift) {
  const Vectorized<T> vshift(shift);
  at::vec::map([vshift](Vectorized<T> x) { return (x - vshift).exp(); }, row, row, n);
  return at::vec::reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, row, n);
}

template <typename T>
void scale_row(T* row, int64_t n, T factor) {
  const Vectorized<T> vf(factor);
  at::vec::map([vf](Vectorized<T> x) { return x * vf; }, row, row, n);
}

// Runs work(item, slot) for every item in [0, count) on up to `threads` threads, handing items
// out in order from a shared counter; slot numbers the calling thread's private scratch.
// Below kSerialWork multiply-adds in all, the items run on the calling thread: waking the
// thread team costs more than it saves on a pack of a few short captions.
constexpr int64_t kSerialWork = int64_t(1) << 22;

template <typename F>
void for_each_item(int64_t count, int64_t threads, int64_t work_size, const F& work) {
  if (work_size < kSerialWork || threads == 1) {
    for (int64_t item = 0; item < count; ++item) work(item, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> slots{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int64_t slot = slots.fetch_add(1);
    TORCH_CHECK(slot < threads, "varlen_attention: more workers than scratch slots");
    for (int64_t item; (item = next.fetch_add(1)) < count;) work(item, slot);
  });
}

struct Item {
  int64_t seq, start, len, first, head, cost;
};

// (sequence, head, row block) items, the costliest first.
std::vector<Item> work_items(const int32_t* cu, int64_t B, int64_t H, int64_t block) {
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = cu[b], len = cu[b + 1] - cu[b];
    for (int64_t first = 0; first < len; first += block)
      for (int64_t h = 0; h < H; ++h)
        items.push_back({b, start, len, first, h, std::min(block, len - first) * len});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

// Key block for a sequence of len tokens: the fewest blocks of at most max_block keys, evened
// out (a 257-token image is one block of 257, not 256 + 1), so most sequences need no
// online rescaling at all.
int64_t key_block(int64_t len, int64_t max_block) {
  const int64_t blocks = std::max<int64_t>(1, (len + max_block - 1) / max_block);
  return (len + blocks - 1) / blocks;
}

int64_t total_cost(const std::vector<Item>& items) {
  int64_t total = 0;
  for (const Item& it : items) total += it.cost;
  return total;
}

template <typename T>
void forward_impl(const Args& args, at::Tensor& out_t, at::Tensor& lse_t) {
  const View<T> w(args);
  const int64_t BQ = args.block_q, BK = args.block_k, Dh = w.Dh, ld = w.ld;
  T* out = out_t.data_ptr<T>();
  T* lse = lse_t.data_ptr<T>();
  const auto items = work_items(w.cu, args.cu_seqlens.numel() - 1, w.H, BQ);
  const int64_t threads = at::get_num_threads();
  std::vector<std::vector<T>> scratch(threads);  // per slot: s [BQ*BK], acc [BQ*Dh], m [BQ], l [BQ]

  for_each_item(static_cast<int64_t>(items.size()), threads, 2 * total_cost(items) * Dh, [&](int64_t index,
                                                                                             int64_t slot) {
    const Item& it = items[index];
    auto& buf = scratch[slot];
    buf.resize(BQ * BK + BQ * Dh + 2 * BQ);
    T *s = buf.data(), *acc = s + BQ * BK, *m = acc + BQ * Dh, *l = m + BQ;
    const int64_t nq = std::min(BQ, it.len - it.first), tq0 = it.start + it.first, h = it.head;
    const T* qb = w.q + tq0 * ld + h * Dh;
    const int64_t bk = key_block(it.len, BK);
    std::fill(acc, acc + nq * Dh, T(0));
    std::fill(m, m + nq, -std::numeric_limits<T>::infinity());
    std::fill(l, l + nq, T(0));
    for (int64_t k0 = 0; k0 < it.len; k0 += bk) {
      const int64_t nk = std::min(bk, it.len - k0), tk0 = it.start + k0;
      gemm<T>(false, true, nq, nk, Dh, w.scale, qb, ld, w.k + tk0 * ld + h * Dh, ld, T(0), s, nk);
      if (w.table) add_bias(w, s, tq0, nq, tk0, nk, h);
      for (int64_t i = 0; i < nq; ++i) {
        T* row = s + i * nk;
        const T m_new = std::max(m[i], row_max(row, nk));
        const T sum = exp_shifted(row, nk, m_new);
        const T rescale = std::exp(m[i] - m_new);  // 0 on the first block (m = -inf)
        if (k0 > 0) scale_row(acc + i * Dh, Dh, rescale);
        l[i] = l[i] * rescale + sum;
        m[i] = m_new;
      }
      gemm<T>(false, false, nq, Dh, nk, T(1), s, nk, w.v + tk0 * ld + h * Dh, ld, T(1), acc, Dh);
    }
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t t = tq0 + i;
      at::vec::map([inv = Vectorized<T>(T(1) / l[i])](Vectorized<T> x) { return x * inv; },
                   out + t * ld + h * Dh, acc + i * Dh, Dh);
      lse[t * w.H + h] = m[i] + std::log(l[i]);
    }
  });
}

template <typename T>
void backward_impl(const Args& args, const at::Tensor& out_t, const at::Tensor& lse_t, const at::Tensor& dout_t,
                   Grads& g) {
  const View<T> w(args);
  const int64_t BQ = args.block_q, BK = args.block_k, Dh = w.Dh, ld = w.ld, H = w.H;
  const T *out = out_t.data_ptr<T>(), *lse = lse_t.data_ptr<T>(), *dout = dout_t.data_ptr<T>();
  T *dq = g.dq.data_ptr<T>(), *dk = g.dk.data_ptr<T>(), *dv = g.dv.data_ptr<T>();
  const bool want_dbias = w.table && g.dtable.defined();
  // One (sequence, head) per item: the item then owns its rows of dq, dk and dv.
  const auto items = work_items(w.cu, args.cu_seqlens.numel() - 1, H, std::numeric_limits<int64_t>::max());
  const int64_t threads = at::get_num_threads();
  const int64_t table_size = want_dbias ? g.dtable.numel() : 0;
  std::vector<std::vector<T>> dtables(threads, std::vector<T>(table_size, T(0)));
  std::vector<std::vector<T>> scratch(threads);  // per slot: p, ds [BQ*BK], delta [len]

  for_each_item(static_cast<int64_t>(items.size()), threads, 5 * total_cost(items) * Dh, [&](int64_t index,
                                                                                             int64_t slot) {
    const Item& it = items[index];
    const int64_t h = it.head, off = h * Dh;
    auto& buf = scratch[slot];
    buf.resize(2 * BQ * BK + it.len);
    T *p = buf.data(), *ds = p + BQ * BK, *delta = ds + BQ * BK;
    for (int64_t i = 0; i < it.len; ++i) {
      const int64_t r = (it.start + i) * ld + off;
      delta[i] = at::vec::map2_reduce_all<T>([](Vectorized<T> a, Vectorized<T> b) { return a * b; },
                                             [](Vectorized<T> a, Vectorized<T> b) { return a + b; },
                                             dout + r, out + r, Dh);
    }
    const int64_t bk = key_block(it.len, BK);
    for (int64_t k0 = 0; k0 < it.len; k0 += bk) {
      const int64_t nk = std::min(bk, it.len - k0), tk0 = it.start + k0, rk = tk0 * ld + off;
      for (int64_t q0 = 0; q0 < it.len; q0 += BQ) {
        const int64_t nq = std::min(BQ, it.len - q0), tq0 = it.start + q0, rq = tq0 * ld + off;
        gemm<T>(false, true, nq, nk, Dh, w.scale, w.q + rq, ld, w.k + rk, ld, T(0), p, nk);
        if (w.table) add_bias(w, p, tq0, nq, tk0, nk, h);
        for (int64_t i = 0; i < nq; ++i) exp_shifted(p + i * nk, nk, lse[(tq0 + i) * H + h]);
        gemm<T>(true, false, nk, Dh, nq, T(1), p, nk, dout + rq, ld, T(1), dv + rk, ld);
        gemm<T>(false, true, nq, nk, Dh, T(1), dout + rq, ld, w.v + rk, ld, T(0), ds, nk);
        for (int64_t i = 0; i < nq; ++i) {
          const Vectorized<T> d(delta[q0 + i]);
          at::vec::map2([d](Vectorized<T> pv, Vectorized<T> dp) { return pv * (dp - d); }, ds + i * nk,
                        p + i * nk, ds + i * nk, nk);
        }
        gemm<T>(false, false, nq, Dh, nk, w.scale, ds, nk, w.k + rk, ld, T(1), dq + rq, ld);
        gemm<T>(true, false, nk, Dh, nq, w.scale, ds, nk, w.q + rq, ld, T(1), dk + rk, ld);
        if (want_dbias) accumulate_dbias(w, ds, dtables[slot].data(), tq0, nq, tk0, nk, h);
      }
    }
  });
  if (want_dbias) {
    T* dtable = g.dtable.data_ptr<T>();
    for (const auto& part : dtables)
      for (int64_t e = 0; e < table_size; ++e) dtable[e] += part[e];
  }
}

}  // namespace

void forward(const Args& args, at::Tensor& out, at::Tensor& lse) {
  if (args.q.scalar_type() == at::kDouble) {
    forward_impl<double>(args, out, lse);
  } else {
    forward_impl<float>(args, out, lse);
  }
}

void backward(const Args& args, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout,
              Grads& grads) {
  if (args.q.scalar_type() == at::kDouble) {
    backward_impl<double>(args, out, lse, dout, grads);
  } else {
    backward_impl<float>(args, out, lse, dout, grads);
  }
}

}  // namespace omni::attention::CPU_CAPABILITY
