"""The load tool (`make bench`, `python -m tests.load.bench`) and its smoke test."""
