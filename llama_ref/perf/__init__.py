"""Measurement: peak memory read one way (``peak``), a training step's memory measured and predicted on fake tensors
(``memory``), and llama-bench's 16 cells (``cells``, ``bench_config``, ``bench_cell``, ``bench``, ``bench_report``)."""
