"""Build the embedded MOOD benchmark from the raw public source pack (``moodguard data build``)."""
from .builder import build_benchmark, counts, jsonl_gz_bytes, normalise

__all__ = ["build_benchmark", "counts", "jsonl_gz_bytes", "normalise"]
