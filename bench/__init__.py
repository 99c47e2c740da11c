"""The benchmark scripts (run each as ``python bench/<name>.py``) and their shared helpers (:mod:`bench.common`)."""
