// The kernel built for AVX2 + FMA. setuptools gives every file of an extension the same
// flags, so instead of -mavx2 this file enables the ISA with a target pragma that covers only
// the vector code included after it: the generic torch headers above it stay baseline, so no
// AVX2 copy of them can leak into code run on an older CPU. GCC's pragma does not define the
// ISA macros that ATen's vector headers and sleef.h test, so they are defined here by hand.
#include <ATen/ATen.h>
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "varlen_attention_kernel.h"
#pragma GCC pop_options
