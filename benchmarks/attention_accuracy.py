"""Measured accuracy of the attention kernels under the Triton interpreter (no GPU needed).

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/attention_accuracy.py

For each dtype and a few decoder-style cases, prints ||x - ref|| / ||ref|| of the Triton
kernel and of the torch reference run in the same precision, both against float64 on the
same rounded inputs: the output, the LSE, and every gradient (varlen), or the output and
LSE of one decode step (``attention_with_kvcache``). Inputs are fixed-seed so the table is
reproducible; the tests (``tests/test_varlen_attention_kernel.py``, ``tests/test_kvcache.py``)
check the same quantities on fresh random inputs.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from omni_core.kernels.decode_attention import decode_attention_triton  # noqa: E402
from omni_core.kernels.varlen_attention import varlen_attention_triton  # noqa: E402

from omni_core import ops  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

VARLEN_CASES = {  # name: (q lengths, k lengths or None, H, Hk, D, causal)
    "causal GQA 4->2, D=72": ([3, 50, 9], None, 4, 2, 72, True),
    "cross, empty keys, MQA, D=40": ([5, 9, 20], [0, 33, 7], 4, 1, 40, False),
    "causal Lq>Lk, D=16": ([30, 5], [9, 0], 2, 2, 16, True),
}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def varlen_run(fn, inputs, dtype, case):
    q_lens, k_lens, H, Hk, D, causal = case
    q, k, v = (inputs[n].to(dtype).clone().requires_grad_() for n in "qkv")
    cross = {} if k_lens is None else {"cu_seqlens_k": cu(k_lens), "max_seqlen_k": max(k_lens)}
    out, lse = fn(q, k, v, cu(q_lens), max(q_lens), None, None, None, None, None, causal=causal, return_lse=True,
                  **cross)
    out.backward(inputs["dout"].to(dtype))
    return {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def varlen_rows():
    for name, case in VARLEN_CASES.items():
        q_lens, k_lens, H, Hk, D, _ = case
        g = torch.Generator().manual_seed(0)
        Tk = sum(k_lens or q_lens)
        inputs = {"q": torch.randn(sum(q_lens), H, D, generator=g), "k": torch.randn(Tk, Hk, D, generator=g),
                  "v": torch.randn(Tk, Hk, D, generator=g), "dout": torch.randn(sum(q_lens), H, D, generator=g)}
        for label, dtype in DTYPES.items():
            rounded = {n: t.to(dtype).double() for n, t in inputs.items()}
            exact = varlen_run(ops.varlen_attention_reference, rounded, torch.float64, case)
            kernel = varlen_run(varlen_attention_triton, inputs, dtype, case)
            torch_same = varlen_run(ops.varlen_attention_reference, inputs, dtype, case)
            finite = torch.isfinite(exact["lse"])
            for key in ("out", "lse", "dq", "dk", "dv"):
                got, ref, same = (r[key].detach() for r in (kernel, exact, torch_same))
                if key == "lse":  # rows without keys are -inf in all three (checked by the tests)
                    got, ref, same = got[finite], ref[finite], same[finite]
                yield f"varlen: {name}", label, key, rel(got, ref), rel(same, ref)


def decode_rows():
    g = torch.Generator().manual_seed(0)
    B, Lq, H, Hk, D, S = 3, 1, 8, 2, 128, 300
    base = {"q": torch.randn(B, Lq, H, D, generator=g), "kc": torch.randn(B, S, Hk, D, generator=g),
            "vc": torch.randn(B, S, Hk, D, generator=g)}
    seqlens = torch.tensor([1, 120, 300], dtype=torch.int32)
    for label, dtype in DTYPES.items():
        def run(fn, dt, inputs):
            return fn(inputs["q"].to(dt), inputs["kc"].to(dt), inputs["vc"].to(dt), seqlens, 0, None, True, True)

        rounded = {n: t.to(dtype).double() for n, t in base.items()}
        exact = run(ops.attention_with_kvcache_reference, torch.float64, rounded)
        kernel = run(lambda *a: decode_attention_triton(*a, num_splits=3), dtype, base)
        torch_same = run(ops.attention_with_kvcache_reference, dtype, base)
        for i, key in enumerate(("out", "lse")):
            yield ("decode: B=3, 8->2 heads, D=128, 3 splits", label, key, rel(kernel[i], exact[i]),
                   rel(torch_same[i], exact[i]))


def main() -> int:
    print("| case | dtype | tensor | Triton (interpreter) | torch same precision |")
    print("|---|---|---|---|---|")
    for case, dtype, key, err, base in [*varlen_rows(), *decode_rows()]:
        print(f"| {case} | {dtype} | {key} | {err:.1e} | {base:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
