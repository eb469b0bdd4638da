"""Benchmarks and simulations of stream_rnn.

A package so that ``python -m simulations.bench`` (every benchmark in one run) can import the
benchmark scripts; each script still runs by its path too (``python simulations/X.py``).
"""
