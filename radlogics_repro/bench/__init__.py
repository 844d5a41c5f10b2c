"""Benchmark suite: how fast the pipeline runs on this machine, against references measured in the
same run (``python -m radlogics_repro.bench``; see :mod:`radlogics_repro.bench.suite`).

Modules: :mod:`.timing` (interleaved medians, table rows), :mod:`.compute` (matmul roof, network
throughput), :mod:`.pipeline` (tf.data vs in-memory ``fit``), :mod:`.gradcam`, :mod:`.dicom`,
:mod:`.study` (the synthetic study, models on disk, child processes), :mod:`.analyze_child` and
:mod:`.peer_child` (the processes whose time and peak memory are measured on their own).
"""
