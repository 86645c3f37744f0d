"""Static kernel report: every Triton kernel config compiled ahead of time, no GPU needed.

Each module of ``omni_core.kernels`` that defines ``aot_configs()`` lists its configs as
:class:`omni_core.kernels._aot.AotConfig`. For every config and every target (sm_80,
sm_90) this script

1. compiles it with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``,
   giving pointers (and the integer arguments the config names) the 16-divisibility hint
   the JIT would give them at run time, so the code is the code a GPU would run;
2. runs the ``ptxas`` shipped with Triton with ``-v`` on the PTX for registers and spills;
3. disassembles the cubin with ``cuobjdump -sass`` and looks for tensor-core instructions
   (``HMMA`` on sm_80, ``HGMMA`` — warpgroup MMA — on sm_90);
4. reports shared memory from the compiled metadata, and the FLOPs and minimum bytes of the
   module's reference problem.

Usage::

    python benchmarks/kernel_report.py --static [--kernel SUBSTR] [--quick]
    python benchmarks/kernel_report.py --json   [--kernel SUBSTR] [--quick]
    python benchmarks/kernel_report.py --traffic [--json] [--kernel SUBSTR] [--case SUBSTR]

The compiler's code path must not be the interpreter's: under ``TRITON_INTERPRET=1`` the
report re-runs itself in a child process without that variable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

TARGETS = (80, 90)
_TENSOR_CORE_OPS = {80: "HMMA", 90: "HGMMA"}


def discover(kernel_filter: str | None = None) -> list[Any]:
    """All AotConfigs of every ``omni_core.kernels`` module, optionally filtered by kernel name."""
    import omni_core.kernels as package

    configs = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"omni_core.kernels.{info.name}")
        if hasattr(module, "aot_configs"):
            configs.extend(module.aot_configs())
    if kernel_filter:
        configs = [c for c in configs if kernel_filter in c.kernel]
    return configs


def quick_subset(configs: list[Any]) -> list[Any]:
    """A fast, still meaningful subset: the first fp16 config of each kernel."""
    seen: set[str] = set()
    subset = []
    for cfg in configs:
        if cfg.dtype == "fp16" and cfg.kernel not in seen:
            seen.add(cfg.kernel)
            subset.append(cfg)
    return subset


def _attrs(cfg: Any) -> dict[tuple[int, ...], list[list[Any]]]:
    attrs = {}
    for index, name in enumerate(cfg.fn.arg_names):
        kind = cfg.signature.get(name)
        if kind is None or kind == "constexpr":
            continue
        if kind.startswith("*") or name in cfg.divisible_by_16:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes = stores + loads) from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}", src,
             "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def _sass_mma(cubin: bytes) -> set[str]:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\b(HGMMA|HMMA)\b", sass))


def compile_config(cfg: Any, capability: int) -> dict[str, Any]:
    """Compile one config for ``sm_<capability>`` and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(cfg.fn, cfg.signature, cfg.constexprs, _attrs(cfg))
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    registers, spills = _ptxas_usage(compiled.asm["ptx"], capability)
    mma = _sass_mma(compiled.asm["cubin"])
    wanted = _TENSOR_CORE_OPS[capability]
    return {
        "kernel": cfg.kernel,
        "target": f"sm_{capability}",
        "dtype": cfg.dtype,
        "config": cfg.label,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "registers": registers,
        "spill_bytes": spills,
        "shared_bytes": int(compiled.metadata.shared),
        "tensor_core": wanted in mma,
        "mma": ",".join(sorted(mma)) or "none",
        "flops": cfg.flops,
        "min_bytes": cfg.min_bytes,
    }


def _failed(cfg: Any, capability: int, err: Exception) -> dict[str, Any]:
    """A row for a config that did not compile: the error, no made-up numbers."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and line.strip() != "^"]
    reason = f"{type(err).__name__}: {lines[-1] if lines else ''}"
    return {"kernel": cfg.kernel, "target": f"sm_{capability}", "dtype": cfg.dtype, "config": cfg.label,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "registers": None,
            "spill_bytes": None, "shared_bytes": None, "tensor_core": False, "mma": "none",
            "flops": cfg.flops, "min_bytes": cfg.min_bytes, "error": reason[:300]}


def iter_report(kernel_filter: str | None = None, quick: bool = False) -> Iterator[dict[str, Any]]:
    """One row per (config, target), as soon as it is compiled."""
    configs = discover(kernel_filter)
    if quick:
        configs = quick_subset(configs)
    for cfg in configs:
        for cap in cfg.extra.get("targets", TARGETS):  # e.g. Hopper-sized tiles: sm_90 only
            try:
                yield compile_config(cfg, cap)
            except Exception as err:  # one broken kernel must not hide the others
                yield _failed(cfg, cap, err)


def report(kernel_filter: str | None = None, quick: bool = False) -> list[dict[str, Any]]:
    return list(iter_report(kernel_filter, quick))


_COLUMNS = (("kernel", 28), ("target", 6), ("dtype", 5), ("config", 52), ("regs", 4), ("spill", 5),
            ("smem", 6), ("mma", 5), ("GFLOP", 6), ("min MB", 6))


def format_row(r: dict[str, Any] | None) -> str:
    """A fixed-width table line (the header for ``None``), so rows can stream out."""
    if r is None:
        cells = [name for name, _ in _COLUMNS]
    elif r.get("error"):
        cells = [r["kernel"], r["target"], r["dtype"], r["config"], "-", "-", "-", "ERROR " + r["error"]]
    else:
        cells = [r["kernel"], r["target"], r["dtype"], r["config"], str(r["registers"]), str(r["spill_bytes"]),
                 str(r["shared_bytes"]), r["mma"], f"{r['flops'] / 1e9:.1f}", f"{r['min_bytes'] / 1e6:.1f}"]
    return "  ".join(cell.ljust(width) for cell, (_, width) in zip(cells, _COLUMNS)).rstrip()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kernel_report", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--static", action="store_true", help="print a table")
    mode.add_argument("--json", action="store_true", help="print a JSON list, one object per config")
    mode.add_argument("--traffic", action="store_true",
                      help="the traffic model (benchmarks/traffic.py): bytes, FLOPs, atomics, roofline; "
                           "with --json, JSON")
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains SUBSTR")
    parser.add_argument("--quick", action="store_true", help="one fp16 config per kernel")
    if "--traffic" in argv:
        # The traffic model runs the kernels under the interpreter: its own process, its own flags.
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        traffic = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traffic.py")
        rest = [a for a in argv if a != "--traffic"]
        return subprocess.run([sys.executable, traffic, *rest], env=env).returncode
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":
        # Kernels decorated under the interpreter cannot be compiled: rerun without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env).returncode

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated
    if args.json:
        rows = report(args.kernel, args.quick)
        print(json.dumps(rows, indent=1))
    else:
        print(format_row(None), flush=True)
        rows = []
        for row in iter_report(args.kernel, args.quick):
            rows.append(row)
            print(format_row(row), flush=True)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
