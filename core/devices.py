"""The one check of a ``--device`` flag before any work: the device must exist on this machine.

    check_device(cfg.device)              # UserError "--device cuda: no CUDA GPU is visible here ..."

``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are the spellings; a CUDA or MPS device this machine does
not have is a one-line error before an output folder is created or a model is loaded (torch would
raise ``RuntimeError: Found no NVIDIA driver`` from inside the first worker or step). torch is
imported only for a GPU device.
"""

from __future__ import annotations

from core.errors import UserError


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` unchanged when it is usable here; else ``UserError`` naming the flag and what to pass."""
    text = str(device)
    kind, _, number = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (number and (kind != "cuda" or not number.isdigit())):
        raise UserError(f"{flag} {text!r} is not cpu, cuda, cuda:N or mps")
    if kind == "cpu":
        return text
    import torch

    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"{flag} mps: no MPS device is available on this machine; pass {flag} cpu")
        return text
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {text}: no CUDA GPU is visible on this machine (torch.cuda.is_available() is "
                        f"False); pass {flag} cpu, or run where a GPU is")
    if number and int(number) >= torch.cuda.device_count():
        raise UserError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return text
