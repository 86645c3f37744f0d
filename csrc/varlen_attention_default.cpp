// The kernel built for any x86-64 CPU (at::vec's generic lanes).
#include <ATen/ATen.h>
#define CPU_CAPABILITY DEFAULT
#include "varlen_attention_kernel.h"
