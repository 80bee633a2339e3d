"""The measuring code of acm-d2, one home for every benchmark (docs/benchmark.md).

* :mod:`~acm_d2.benchmarks.timing`: interleaved timing, peak memory, the stage shapes;
* :mod:`~acm_d2.benchmarks.module`: one ACM against plain ops, the authors' module, the floor;
* :mod:`~acm_d2.benchmarks.peers`: ACM and its peers (SE, GC, CBAM, NL, CC), modules and models;
* :mod:`~acm_d2.benchmarks.model`: whole Mask R-CNN R-50-FPN models sharing their weights.

``tools/benchmark.py`` is the command line over them.
"""
