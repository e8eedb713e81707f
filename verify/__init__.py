"""The verification library: one check per property, each returning a CheckResult, and the bug zoo that proves it."""
from .checks.gradient_checkpointing import check_gradient_checkpointing
from .compare import Comparison, compare, compare_calibrated, compare_grads
from .checks.grad_accum import check_grad_accumulation
from .checks.kv_cache import check_kv_cache
from .checks.lora_merge import check_lora_merge
from .checks.loss_kernel import check_loss_kernel
from .checks.mixed_precision import check_mixed_precision
from .checks.packing import check_packing
from .result import CheckResult
from .tolerances import Tolerance, tolerance

__all__ = ["CheckResult", "Comparison", "Tolerance", "check_grad_accumulation", "check_gradient_checkpointing",
           "check_kv_cache", "check_lora_merge", "check_loss_kernel", "check_mixed_precision", "check_packing",
           "compare", "compare_calibrated",
           "compare_grads", "tolerance"]
