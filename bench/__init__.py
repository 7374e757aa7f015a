"""Benchmarks of cantobot's cost per speaker: ``python -m bench`` (``--quick`` for a short run).

Rows (see bench/README.md): 1 receive path per packet (:mod:`bench.receive`), 2 upstream
sessions (:mod:`bench.upstream`), 3 the whole bot (:mod:`bench.whole`), 4 the libopus floor and
the peers (:mod:`bench.receive`, :mod:`bench.peers`), and memory (:mod:`bench.memory`).
Not part of the test suite; ``tests/test_bench_smoke.py`` only checks the code still runs.
"""
