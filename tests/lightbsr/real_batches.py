"""Training examples cut from the real sample photographs and degraded with lightbsr.degrade.

Shared by the objective tests (plain PyTorch) and the Ray Train tests (an in-memory Ray Dataset
with the columns of the batch contract). They live in `lightbsr.small_runs`, beside the small
training runs of the claims study, which must not import from tests.
"""

from lightbsr.small_runs import as_float_batch, blind_blur_eval_set, degraded_examples, load_photos

__all__ = ["as_float_batch", "blind_blur_eval_set", "degraded_examples", "load_photos"]
