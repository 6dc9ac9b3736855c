"""Distributed runtime: launcher detection, Megatron-Core process groups, CPU compatibility.

The only package that touches ``megatron.core.parallel_state``; everything else gets a
``ParallelContext``.
"""
