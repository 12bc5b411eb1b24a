"""How the sweeps (``module_sweep.py``, ``timm_sweep.py``) classify one :class:`mgs_torch.VerifyReport`."""

from __future__ import annotations

CATEGORIES = ("ok", "K only", "wrong", "refused", "interact", "too big")


def classify(report) -> tuple[str, str]:
    """(category, what to print after the model's label): a failure that is memory is "too big" (the float64
    loop does not fit), any other failure "refused"; samples that interact; a PROBLEM is "wrong"; an OK
    whose penalty gradient was not checked is "K only"."""
    if report.failure is not None:
        if "allocate memory" in report.failure or "out of memory" in report.failure:
            return "too big", "the float64 reference loop does not fit in memory"
        return "refused", report.failure.splitlines()[0][:300]
    if report.samples_interact is not None:
        return "interact", f"{report.samples_interact:.1e} (dim 0 is not the batch?)"
    if not report.ok:
        return "wrong", f"K {report.kernel_error}, ∂tr K {report.gradient_error}; {'; '.join(report.notes)}"
    if report.gradient_error is None:
        return "K only", f"K {report.kernel_error:.1e}; {'; '.join(report.notes)[:300]}"
    how = "" if report.gradient_check == "autograd" else " by finite differences"
    return "ok", f"K {report.kernel_error:.1e}, ∂tr K {report.gradient_error:.1e}{how}"
