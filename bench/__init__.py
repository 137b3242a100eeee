"""Benchmarks: kernelfleet against the stock Jupyter stack on the same machine (``make bench``).

See bench/README.md for what is measured, how, and the latest results.
"""
