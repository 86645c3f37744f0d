// Varlen attention with the learned per-modality relative-position bias: the one kernel
// source, compiled once per CPU capability (see varlen_attention.h). Include it only after
// defining CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and the matching CPU_CAPABILITY_* macro.
//
// Semantics (omni_core/ops/attention.py): q [Tq, H, Dh], k and v [Tk, Hk, Dh] with Hk
// dividing H (query head h reads key/value head h / (H / Hk): grouped-query attention);
// query sequence b is the tokens cu_q[b] .. cu_q[b+1], its keys cu_k[b] .. cu_k[b+1] (the
// same boundaries for self-attention). logit(i, j) = scale * q_i . k_j, plus
// table[lut[m, pos_i, pos_j], h] when modality_i == modality_j == m and the entry is >= 0
// (self-attention only). Causal (bottom-right, as flash-attn): query i of a sequence with Lq
// queries and Lk keys sees key j iff j <= i + Lk - Lq. A query that sees no key outputs 0
// and has lse -inf.
//
// Forward: FlashAttention-2's blocked online softmax. One work item is (sequence, head,
// query block); it walks the key blocks it can see, keeping a running row max m, row sum l
// and an unnormalised output, so no [L, L] logit, bias or mask is ever materialised. It
// saves lse = m + log(l) per (token, head) for the backward.
//
// Backward: one work item is (sequence, key/value head); for each query head of its group it
// walks key blocks, and for each key block every query block that sees it, recomputing
// P = exp(S - lse) from the saved lse:
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O) + dlse),
//   dQ += scale dS K,  dK += scale dS^T Q,  dtable[lut entry, h] += dS (biased pairs).
// (dlse, the gradient of the returned lse, is 0 unless the caller used it.) A work item owns
// its rows of dQ and of dK, dV (every query head of the group is in it: no atomics); dtable,
// shared by all sequences, is accumulated in one private copy per thread and summed at the end.
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
  const int32_t *cu_q, *cu_k;
  int64_t H, G, Dh, ldq, ldk;  // G query heads per key head; ld*: elements between tokens
  T scale;
  bool causal;
  const T* table;  // nullptr: no bias
  const int32_t *lut, *modality, *position;
  LutForm lut_form;
  int64_t P, lut_width, NB;  // lut_width: entries per modality row of the LUT
  // Set when a LUT entry the kernel reads is neither -1 nor a table row: the LUT is checked
  // where it is read, not scanned whole on every call (a dense [M, P, P] LUT: 1.7M entries for
  // 751 audio positions, scanned twice per layer it cost more than the attention itself).
  mutable std::atomic<bool> bad_entry{false};

  explicit View(const Args& a)
      : q(a.q.data_ptr<T>()), k(a.k.data_ptr<T>()), v(a.v.data_ptr<T>()),
        cu_q(a.cu_seqlens.data_ptr<int32_t>()), cu_k(a.cu_seqlens_k.data_ptr<int32_t>()), H(a.q.size(1)),
        G(a.q.size(1) / a.k.size(1)), Dh(a.q.size(2)), ldq(H * Dh), ldk(a.k.size(1) * Dh),
        scale(static_cast<T>(a.scale)), causal(a.causal), table(a.table.defined() ? a.table.data_ptr<T>() : nullptr),
        lut(table ? a.lut.data_ptr<int32_t>() : nullptr),
        modality(table ? a.modality.data_ptr<int32_t>() : nullptr),
        position(table ? a.position.data_ptr<int32_t>() : nullptr), lut_form(a.lut_form),
        P(table ? a.lut_positions : 0), lut_width(table ? a.lut.numel() / a.lut.size(0) : 0),
        NB(table ? a.table.size(0) : 0) {}

  // Column of modality m's LUT row for positions (pq, pk), in the LUT's form.
  int64_t lut_column(int64_t pq, int64_t pk) const {
    switch (lut_form) {
      case LutForm::kDense:
        return pq * P + pk;
      case LutForm::kRelative:
        return pk - pq + P - 1;
      case LutForm::kClsRelative:
        if (pq > 0 && pk > 0) return pk - pq + P - 1;
        return pq == 0 ? (pk == 0 ? 2 * P + 1 : 2 * P - 1) : 2 * P;
    }
    return 0;
  }

  // The bias_table row of (query token tq, key token tk), or -1 when the pair gets none.
  int64_t bias_entry(int64_t tq, int64_t tk) const {
    const int32_t m = modality[tq];
    if (modality[tk] != m) return -1;
    const int64_t e = lut[static_cast<int64_t>(m) * lut_width + lut_column(position[tq], position[tk])];
    if (e < -1 || e >= NB) {
      bad_entry.store(true, std::memory_order_relaxed);
      return -1;
    }
    return e;
  }

  void check_entries() const {
    TORCH_CHECK(!bad_entry.load(), "varlen_attention (native): bias_lut entries must be -1 (no bias) or in [0, ", NB,
                ") (bias_table rows)");
  }
};

// One sequence: its query and key token ranges and the causal shift Lk - Lq.
struct Seq {
  int64_t q_start, q_len, k_start, k_len;
  // Keys [0, visible_keys(i)) are visible to local query i (all of them without a causal mask).
  int64_t visible_keys(int64_t i, bool causal) const {
    return causal ? std::clamp<int64_t>(i + 1 + k_len - q_len, 0, k_len) : k_len;
  }
};

template <typename T>
Seq sequence(const View<T>& w, int64_t b) {
  return {w.cu_q[b], w.cu_q[b + 1] - w.cu_q[b], w.cu_k[b], w.cu_k[b + 1] - w.cu_k[b]};
}

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

// Causal mask of the block (local queries q0.., keys k0..): logits of keys a query cannot see
// become -inf. Only blocks crossing the diagonal have any.
template <typename T>
void mask_causal(const Seq& sq, T* s, int64_t q0, int64_t nq, int64_t k0, int64_t nk) {
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t visible = sq.visible_keys(q0 + i, true) - k0;
    if (visible < nk) std::fill(s + i * nk + std::max<int64_t>(visible, 0), s + (i + 1) * nk,
                                -std::numeric_limits<T>::infinity());
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
  int64_t seq, first, head, cost;  // first: the first query row (forward) of the item
};

// Forward items: (sequence, query head, query block), the costliest first.
template <typename T>
std::vector<Item> forward_items(const View<T>& w, int64_t B, int64_t block) {
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    const Seq sq = sequence(w, b);
    for (int64_t first = 0; first < sq.q_len; first += block) {
      const int64_t nq = std::min(block, sq.q_len - first);
      const int64_t keys = sq.visible_keys(first + nq - 1, w.causal);  // the block's last row sees the most
      // a block that sees no key still gets an item: it writes its zero rows
      for (int64_t h = 0; h < w.H; ++h) items.push_back({b, first, h, nq * std::max<int64_t>(keys, 1)});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

// Backward items: (sequence, key/value head), the costliest first; sequences without a
// visible (query, key) pair have nothing to do.
template <typename T>
std::vector<Item> backward_items(const View<T>& w, int64_t B) {
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    const Seq sq = sequence(w, b);
    if (sq.q_len == 0 || sq.visible_keys(sq.q_len - 1, w.causal) == 0) continue;
    for (int64_t hk = 0; hk < w.H / w.G; ++hk) items.push_back({b, 0, hk, w.G * sq.q_len * sq.k_len});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

// Key block for a sequence of len keys: the fewest blocks of at most max_block keys, evened
// out (a 257-token image is one block of 257, not 256 + 1), so most sequences need no
// online rescaling at all.
int64_t key_block(int64_t len, int64_t max_block) {
  const int64_t blocks = std::max<int64_t>(1, (len + max_block - 1) / max_block);
  return std::max<int64_t>(1, (len + blocks - 1) / blocks);
}

int64_t total_cost(const std::vector<Item>& items) {
  int64_t total = 0;
  for (const Item& it : items) total += it.cost;
  return total;
}

template <typename T>
void forward_impl(const Args& args, at::Tensor& out_t, at::Tensor& lse_t) {
  const View<T> w(args);
  const int64_t BQ = args.block_q, BK = args.block_k, Dh = w.Dh, H = w.H;
  const T inf = std::numeric_limits<T>::infinity();
  T* out = out_t.data_ptr<T>();
  T* lse = lse_t.data_ptr<T>();
  const auto items = forward_items(w, args.cu_seqlens.numel() - 1, BQ);
  const int64_t threads = at::get_num_threads();
  std::vector<std::vector<T>> scratch(threads);  // per slot: s [BQ*BK], acc [BQ*Dh], m [BQ], l [BQ]

  for_each_item(static_cast<int64_t>(items.size()), threads, 2 * total_cost(items) * Dh, [&](int64_t index,
                                                                                             int64_t slot) {
    const Item& it = items[index];
    const Seq sq = sequence(w, it.seq);
    auto& buf = scratch[slot];
    buf.resize(BQ * BK + BQ * Dh + 2 * BQ);
    T *s = buf.data(), *acc = s + BQ * BK, *m = acc + BQ * Dh, *l = m + BQ;
    const int64_t nq = std::min(BQ, sq.q_len - it.first), tq0 = sq.q_start + it.first, h = it.head;
    const int64_t kv_off = (h / w.G) * Dh;
    const T* qb = w.q + tq0 * w.ldq + h * Dh;
    const int64_t keys = sq.visible_keys(it.first + nq - 1, w.causal);  // the last row sees the most
    const int64_t bk = key_block(sq.k_len, BK);
    std::fill(acc, acc + nq * Dh, T(0));
    std::fill(m, m + nq, -inf);
    std::fill(l, l + nq, T(0));
    for (int64_t k0 = 0; k0 < keys; k0 += bk) {
      const int64_t nk = std::min(bk, keys - k0), tk0 = sq.k_start + k0;
      gemm<T>(false, true, nq, nk, Dh, w.scale, qb, w.ldq, w.k + tk0 * w.ldk + kv_off, w.ldk, T(0), s, nk);
      if (w.table) add_bias(w, s, tq0, nq, tk0, nk, h);
      if (w.causal) mask_causal(sq, s, it.first, nq, k0, nk);
      for (int64_t i = 0; i < nq; ++i) {
        T* row = s + i * nk;
        const T m_new = std::max(m[i], row_max(row, nk));
        if (m_new == -inf) {  // nothing visible to this row yet: it adds nothing
          std::fill(row, row + nk, T(0));
          continue;
        }
        const T sum = exp_shifted(row, nk, m_new);
        const T rescale = std::exp(m[i] - m_new);  // 0 on the row's first block (m = -inf)
        if (l[i] > T(0)) scale_row(acc + i * Dh, Dh, rescale);
        l[i] = l[i] * rescale + sum;
        m[i] = m_new;
      }
      gemm<T>(false, false, nq, Dh, nk, T(1), s, nk, w.v + tk0 * w.ldk + kv_off, w.ldk, T(1), acc, Dh);
    }
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t t = tq0 + i;
      T* row = out + t * w.ldq + h * Dh;
      if (l[i] == T(0)) {  // sees no key: outputs 0, lse -inf
        std::fill(row, row + Dh, T(0));
        lse[t * H + h] = -inf;
        continue;
      }
      at::vec::map([inv = Vectorized<T>(T(1) / l[i])](Vectorized<T> x) { return x * inv; }, row, acc + i * Dh, Dh);
      lse[t * H + h] = m[i] + std::log(l[i]);
    }
  });
  w.check_entries();
}

template <typename T>
void backward_impl(const Args& args, const at::Tensor& out_t, const at::Tensor& lse_t, const at::Tensor& dout_t,
                   const at::Tensor& dlse_t, Grads& g) {
  const View<T> w(args);
  const int64_t BQ = args.block_q, BK = args.block_k, Dh = w.Dh, H = w.H;
  const T inf = std::numeric_limits<T>::infinity();
  const T *out = out_t.data_ptr<T>(), *lse = lse_t.data_ptr<T>(), *dout = dout_t.data_ptr<T>();
  const T* dlse = dlse_t.defined() ? dlse_t.data_ptr<T>() : nullptr;
  T *dq = g.dq.data_ptr<T>(), *dk = g.dk.data_ptr<T>(), *dv = g.dv.data_ptr<T>();
  const bool want_dbias = w.table && g.dtable.defined();
  const auto items = backward_items(w, args.cu_seqlens.numel() - 1);
  const int64_t threads = at::get_num_threads();
  const int64_t table_size = want_dbias ? g.dtable.numel() : 0;
  std::vector<std::vector<T>> dtables(threads, std::vector<T>(table_size, T(0)));
  std::vector<std::vector<T>> scratch(threads);  // per slot: p, ds [BQ*BK], delta [Lq]

  for_each_item(static_cast<int64_t>(items.size()), threads, 5 * total_cost(items) * Dh, [&](int64_t index,
                                                                                             int64_t slot) {
    const Item& it = items[index];
    const Seq sq = sequence(w, it.seq);
    auto& buf = scratch[slot];
    buf.resize(2 * BQ * BK + sq.q_len);
    T *p = buf.data(), *ds = p + BQ * BK, *delta = ds + BQ * BK;
    const int64_t bk = key_block(sq.k_len, BK), kv_off = it.head * Dh;
    for (int64_t h = it.head * w.G; h < (it.head + 1) * w.G; ++h) {
      const int64_t off = h * Dh;
      // delta_i = rowsum(dO * O) - dlse_i: the softmax backward's per-row shift.
      for (int64_t i = 0; i < sq.q_len; ++i) {
        const int64_t t = sq.q_start + i, r = t * w.ldq + off;
        delta[i] = at::vec::map2_reduce_all<T>([](Vectorized<T> a, Vectorized<T> b) { return a * b; },
                                               [](Vectorized<T> a, Vectorized<T> b) { return a + b; },
                                               dout + r, out + r, Dh);
        if (dlse) delta[i] -= dlse[t * H + h];
      }
      for (int64_t k0 = 0; k0 < sq.k_len; k0 += bk) {
        const int64_t nk = std::min(bk, sq.k_len - k0), tk0 = sq.k_start + k0, rk = tk0 * w.ldk + kv_off;
        for (int64_t q0 = 0; q0 < sq.q_len; q0 += BQ) {
          const int64_t nq = std::min(BQ, sq.q_len - q0), tq0 = sq.q_start + q0, rq = tq0 * w.ldq + off;
          if (sq.visible_keys(q0 + nq - 1, w.causal) <= k0) continue;  // the block sees none of these keys
          gemm<T>(false, true, nq, nk, Dh, w.scale, w.q + rq, w.ldq, w.k + rk, w.ldk, T(0), p, nk);
          if (w.table) add_bias(w, p, tq0, nq, tk0, nk, h);
          if (w.causal) mask_causal(sq, p, q0, nq, k0, nk);
          for (int64_t i = 0; i < nq; ++i) {
            const T row_lse = lse[(tq0 + i) * H + h];
            if (row_lse == -inf) {
              std::fill(p + i * nk, p + (i + 1) * nk, T(0));  // a row that sees no key has P = 0
            } else {
              exp_shifted(p + i * nk, nk, row_lse);
            }
          }
          gemm<T>(true, false, nk, Dh, nq, T(1), p, nk, dout + rq, w.ldq, T(1), dv + rk, w.ldk);
          gemm<T>(false, true, nq, nk, Dh, T(1), dout + rq, w.ldq, w.v + rk, w.ldk, T(0), ds, nk);
          for (int64_t i = 0; i < nq; ++i) {
            const Vectorized<T> d(delta[q0 + i]);
            at::vec::map2([d](Vectorized<T> pv, Vectorized<T> dp) { return pv * (dp - d); }, ds + i * nk,
                          p + i * nk, ds + i * nk, nk);
          }
          gemm<T>(false, false, nq, Dh, nk, w.scale, ds, nk, w.k + rk, w.ldk, T(1), dq + rq, w.ldq);
          gemm<T>(true, false, nk, Dh, nq, w.scale, ds, nk, w.q + rq, w.ldq, T(1), dk + rk, w.ldk);
          if (want_dbias) accumulate_dbias(w, ds, dtables[slot].data(), tq0, nq, tk0, nk, h);
        }
      }
    }
  });
  w.check_entries();
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
              const at::Tensor& dlse, Grads& grads) {
  if (args.q.scalar_type() == at::kDouble) {
    backward_impl<double>(args, out, lse, dout, dlse, grads);
  } else {
    backward_impl<float>(args, out, lse, dout, dlse, grads);
  }
}

}  // namespace omni::attention::CPU_CAPABILITY
