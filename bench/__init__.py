"""Benchmarks of aspd_kernels: every op against the alternatives a user would pick, beside the measured hardware
ceilings, and the decoder end to end. Run ``python -m bench --help``; bench/README.md documents the JSONL schema.
"""
