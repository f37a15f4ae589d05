"""Benchmarks: jaxpoison against the stack a user would otherwise reach for (HF transformers on torch).

Every benchmark times its contenders in one process, alternating them over several rounds, and reports the
machine's fp32 matmul peak measured in the same run: on a shared machine speed drifts within minutes, so only
numbers taken side by side compare. torch and transformers are imported here and nowhere else in the library.
"""
