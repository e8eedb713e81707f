"""The command-line layer: one dataclass→argparse builder (``options``), one progress bar (``progress``), the
``llama-finetune`` (``finetune``; its run in ``finetune_run``, its resumable state in ``resume``) and ``llama-bench``
(``bench``) entry points."""
