#!/usr/bin/env python
"""The GPU check (the code is acm_d2/benchmarks/gpu_check.py; docs/benchmark.md, "On a GPU").

    make gpu-check                                           # set-up, then the check on cuda
    python tools/gpu_check.py --output-dir out/gpu_check     # the CUDA tests, model, module, demo
    python tools/gpu_check.py --device cpu --quick           # the same parts at tiny sizes (~75 s)

Writes OUTPUT_DIR/gpu_check.json and OUTPUT_DIR/gpu_check.md, and prints the latter.
"""
from acm_d2.benchmarks.gpu_check import main, render_markdown

if __name__ == "__main__":
    report = main()
    if report is not None:
        print(render_markdown(report))
