"""Benchmarks that print tables and a last line of JSON. Run each as a module from the project root,
e.g. ``python -m bench.attention --quick`` (``--help`` lists a benchmark's options)."""
