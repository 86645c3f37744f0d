// The kernel built for AVX-512 (F, BW, VL, DQ, like ATen's own AVX512 kernels); see
// varlen_attention_avx2.cpp for why a target pragma and hand-defined ISA macros.
#include <ATen/ATen.h>
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "varlen_attention_kernel.h"
#pragma GCC pop_options
