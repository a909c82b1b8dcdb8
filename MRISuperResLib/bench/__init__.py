"""Benchmark: quality, speed and memory of every method on every case and suitable degradation."""
