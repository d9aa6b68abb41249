"""Correctness checks that need a CUDA GPU (the test suite runs on CPU only).

1. `degrade` on the GPU against the CPU (both fused paths: separable matmuls for setting 1,
   composite convolutions for setting 2) and the sampler's `degrade_views` on the device.
2. The authors' x4 student (parity vectors, ../shared/vectors) on CUDA in full fp32 (TF32 off)
   against the reference outputs, bar 1e-4 relative max error as on CPU.
3. fp16 and bf16 autocast of a small student with O(1) layer scales, against fp32 on the GPU.

Each check prints its figure; the whole run is written to benchmarks/results/gpu_checks.json and the
exit status is 1 when a check fails, 2 without a GPU.

    python benchmarks/gpu_checks.py
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from lightbsr.degrade import DegradationSampler, degrade, kernel_pca_basis
from lightbsr.reference import load_reference_checkpoint
from lightbsr.student import Student

REPO = Path(__file__).resolve().parents[1]
PARITY_VECTORS = REPO.parent / "shared" / "vectors" / "reference-parity.pt"
RESULTS = REPO / "benchmarks" / "results" / "gpu_checks.json"
PARITY_BAR = 1e-4  # relative max error, as tests/lightbsr/test_reference_parity.py on CPU
AUTOCAST_BAR = 5e-2  # max |mixed - fp32| / max |fp32|


def relative_max_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


def check_degrade(basis: torch.Tensor) -> dict:
    """GPU LR within one 8-bit level of the CPU's, and off by one on under 0.5% of the pixels."""
    figures = {}
    for setting in (1, 2):
        sampler = DegradationSampler(4, setting, basis)
        drawn = sampler.sample(8, torch.Generator().manual_seed(51))
        hr = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(50))
        cpu = degrade(hr, drawn.kernel, 4)
        gpu = degrade(hr.cuda(), drawn.kernel.cuda(), 4).cpu()
        levels = ((cpu - gpu) * 255.0).round().abs()
        views = sampler.degrade_views(
            hr.view(2, 4, 3, 128, 128).cuda(), sampler.sample(2), torch.Generator(device="cuda").manual_seed(0)
        )
        figures[f"setting{setting}"] = {
            "max_levels": levels.max().item(),
            "fraction_off": (levels > 0).float().mean().item(),
            "views_on_gpu": views.is_cuda and tuple(views.shape) == (2, 4, 3, 32, 32),
        }
    passed = all(f["max_levels"] <= 1 and f["fraction_off"] < 0.005 and f["views_on_gpu"] for f in figures.values())
    return {"passed": passed, **figures}


def check_reference_parity() -> dict:
    if not PARITY_VECTORS.is_file():
        return {"passed": False, "error": f"parity vectors not found at {PARITY_VECTORS}"}
    case = torch.load(PARITY_VECTORS, weights_only=True)["student_x4"]
    student = load_reference_checkpoint(case["state_dict"], role="student", scale=4).cuda().eval()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 for parity
    try:
        with torch.inference_mode():
            sr, ca, xk = student(case["lr"].cuda(), return_codes=True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    errors = {
        label: relative_max_error(ours.cpu(), case[label]) for label, ours in (("sr", sr), ("ca", ca), ("xk", xk))
    }
    return {"passed": max(errors.values()) <= PARITY_BAR, "relative_max_error": errors}


def check_autocast() -> dict:
    torch.manual_seed(0)
    student = Student(scale=4, n_groups=1, n_blocks=2).cuda().eval()
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if name.endswith("gamma"):  # layer scales start at 1e-6, which hides every block
                parameter.uniform_(0.5, 1.0)
    lr = torch.rand(1, 3, 63, 65, device="cuda")
    errors, kept_shape_and_dtype = {}, True
    with torch.inference_mode():
        reference = student(lr)
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype):
                mixed = student(lr)
            kept_shape_and_dtype &= mixed.shape == (1, 3, 252, 260) and mixed.dtype == dtype
            errors[str(dtype).removeprefix("torch.")] = relative_max_error(mixed, reference)
    passed = kept_shape_and_dtype and max(errors.values()) < AUTOCAST_BAR
    return {"passed": passed, "shape_and_dtype": kept_shape_and_dtype, "relative_max_error": errors}


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device", file=sys.stderr)
        return 2
    results = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "degrade": check_degrade(kernel_pca_basis(seed=0)),
        "reference_parity": check_reference_parity(),
        "autocast": check_autocast(),
    }
    print(json.dumps(results, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    failed = [name for name, value in results.items() if isinstance(value, dict) and not value["passed"]]
    print(f"gpu_checks: {'FAILED ' + ', '.join(failed) if failed else 'all passed'} -> {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
