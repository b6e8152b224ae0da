"""Benchmarks: ray_align against the raw engines it orchestrates, side by side in one run.

Each contender runs in its own fresh process (same model, prompts and sampling), reports its
start-up seconds apart from its steady-state throughput, and its peak memory.
"""
