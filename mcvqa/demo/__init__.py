"""The demo wing: a tiny synthetic dataset and a tiny Qwen-VL built locally, for CPU runs and tests."""
