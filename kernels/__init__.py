"""Triton kernels, one file per op family, each with its launcher and autograd wiring.

Installed as ``omni_core.kernels``. Every module exposes ``aot_configs()`` for
``benchmarks/kernel_report.py`` (the static sm_80 / sm_90 report).
"""
