"""The command-line layer: one dataclass→argparse builder (``options``), one progress bar (``progress``), and the
``llama-finetune`` (``finetune``) and ``llama-bench`` (``bench``) entry points."""
