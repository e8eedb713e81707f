"""Training: instruction data (``data``), one optimizer step over a window of micro-batches (``trainer``), the
optimizer and schedule (``optim``), seeding that leaves the caller's RNG alone (``rng``), and ``TrainConfig`` with
the model built and prepared as it says (``config``). Imported module by module: nothing is loaded here."""
