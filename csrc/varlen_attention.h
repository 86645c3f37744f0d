// Native CPU varlen attention: shared declarations.
//
// One kernel source (varlen_attention_kernel.h) is compiled three times, once per CPU
// capability (DEFAULT, AVX2, AVX512: varlen_attention_{default,avx2,avx512}.cpp), each in its
// own namespace so the copies never collide; varlen_attention.cpp picks one at run time from
// at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY like ATen's own kernels.
#pragma once

#include <ATen/ATen.h>

namespace omni::attention {

// Everything a kernel reads. Tensors are contiguous, on the CPU, in one float dtype
// (float or double): q [Tq, H, Dh], k and v [Tk, Hk, Dh]; cu_seqlens_k is cu_seqlens for
// self-attention. `table` is undefined when there is no bias (always, for cross-attention),
// else table [NB, H], modality int32 [T], position int32 [T] in [0, P) and lut int32 in one
// of three forms (ops/attention.py): dense [M, P, P], relative [M, 2P-1] (column
// pos_k - pos_q + P - 1) or CLS-aware relative [M, 2P+2] (the relative column between
// positions >= 1; columns 2P-1, 2P, 2P+1 when the query, the key or both are position 0).
enum class LutForm : int { kDense = 0, kRelative = 1, kClsRelative = 2 };

struct Args {
  at::Tensor q, k, v, cu_seqlens, cu_seqlens_k;
  double scale = 1.0;
  bool causal = false;
  at::Tensor table, lut, modality, position;
  LutForm lut_form = LutForm::kDense;
  int64_t lut_positions = 0;  // P
  int64_t block_q = 64, block_k = 512;  // block_k: the most keys per block (see key_block)
};

// Grads are zero-initialised by the caller and accumulated into; dtable is undefined when
// the bias table needs no gradient. The backward's dlse (gradient of the returned lse,
// [Tq, H]) is undefined when the caller did not use the lse.
struct Grads {
  at::Tensor dq, dk, dv, dtable;
};

#define OMNI_DECLARE_KERNELS(CAP)                                                        \
  namespace CAP {                                                                        \
  void forward(const Args& args, at::Tensor& out, at::Tensor& lse);                      \
  void backward(const Args& args, const at::Tensor& out, const at::Tensor& lse,          \
                const at::Tensor& dout, const at::Tensor& dlse, Grads& grads);           \
  }
OMNI_DECLARE_KERNELS(DEFAULT)
OMNI_DECLARE_KERNELS(AVX2)
OMNI_DECLARE_KERNELS(AVX512)
#undef OMNI_DECLARE_KERNELS

}  // namespace omni::attention

// Fortran BLAS, exported by libtorch_cpu (MKL on x86 wheels). Called from inside
// at::parallel_for, where MKL runs single-threaded (nested OpenMP is off).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}
