"""Resolving the device and dtype a user asks for, with clear errors for ones that do not exist."""

from __future__ import annotations

import torch

from mechkit.errors import DeviceError, did_you_mean

__all__ = ["resolve_device", "resolve_dtype"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: CUDA when present and nothing was asked, else what was asked.

    Raises:
        DeviceError: the string is not a device, or the device is not on this machine.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(
            f"Expected a device such as 'cpu', 'cuda' or 'cuda:0'; got {device!r}, which torch "
            f"does not recognise ({exc}). Hint: leave device=None to use CUDA when present."
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"Expected a device this machine has; got {str(dev)!r}, but torch sees no CUDA "
                f"GPU here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
                "Hint: use device='cpu', or install a CUDA build of torch (see the README)."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(
                f"Expected a CUDA device index below {count}; got {str(dev)!r}. "
                f"Hint: this machine has cuda:0 to cuda:{count - 1}."
            )
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(
                "Expected a device this machine has; got 'mps', which is not available here. "
                "Hint: use device='cpu'."
            )
        return dev
    raise DeviceError(
        f"Expected 'cpu', 'cuda[:N]' or 'mps'; got {str(dev)!r}, which mechkit does not run on."
    )


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """The torch dtype for a name such as 'bfloat16' (None means float32).

    Example:
        >>> resolve_dtype("bf16")
        torch.bfloat16
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise DeviceError(f"Expected a floating-point dtype for model weights; got {dtype}.")
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise DeviceError(
            f"Expected a dtype among {sorted(set(_DTYPES))}; got {dtype!r}."
            + (did_you_mean(key, _DTYPES) or " Hint: float32 is exact, bfloat16 halves the memory.")
        )
    return _DTYPES[key]
