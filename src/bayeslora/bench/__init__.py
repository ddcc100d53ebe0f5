"""Benchmarks: the calibration grid (``grid``, ``ood``, ``selective``, ``report``, ``results_md``).

Imported lazily by ``bayeslora bench ...``; the modules load torch and the models only when a benchmark runs.
"""
