"""Resolving the device and dtype a user asks for, with clear errors for ones that do not exist."""

from __future__ import annotations

from typing import Any

import torch

from mechkit.errors import DeviceError, InvalidArgumentError, did_you_mean

__all__ = ["block_devices", "place_blocks", "resolve_device", "resolve_dtype"]

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


def block_devices(n_layers: int, n_devices: int, first: str | torch.device) -> list[torch.device]:
    """The device of each block when a model is split across ``n_devices`` GPUs from ``first``.

    The rule is TransformerLens's own ``get_device_for_block_index``, by which its forward pass
    moves the residual stream between blocks: block ``i`` is on GPU ``first + i * n_devices //
    n_layers``. (TransformerLens's ``move_model_modules_to_device`` places modules by free
    memory instead, which can disagree with that rule: mechkit places them itself.)

    Raises:
        DeviceError: more than one device, but ``first`` is not a CUDA device, or more devices
            than blocks.

    Example:
        >>> [str(d) for d in block_devices(4, 2, "cuda")]  # no GPU needed to plan
        ['cuda:0', 'cuda:0', 'cuda:1', 'cuda:1']
    """
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise InvalidArgumentError(f"Expected n_devices to be a positive int; got {n_devices!r}.")
    dev = torch.device(first)
    if n_devices == 1:
        return [dev] * n_layers
    if dev.type != "cuda":
        raise DeviceError(
            f"Expected CUDA GPUs to split a model across n_devices={n_devices}; got device "
            f"{str(dev)!r}. Hint: TransformerLens splits blocks across GPUs only; on CPU use "
            "n_devices=1."
        )
    if n_devices > n_layers:
        raise DeviceError(
            f"Expected n_devices at most the number of blocks ({n_layers}); got {n_devices}."
        )
    base = dev.index or 0
    return [torch.device("cuda", base + i * n_devices // n_layers) for i in range(n_layers)]


def place_blocks(model: Any, devices: list[torch.device]) -> Any:
    """Move ``model``'s modules to ``devices`` (one per block, from :func:`block_devices`): the
    embeddings with the first block, the final norm and unembedding with the last, and set
    ``cfg.device``/``cfg.n_devices`` so that TransformerLens's forward moves the residual
    stream along. Returns the model (changed in place).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> model = place_blocks(model, [torch.device("cpu")] * 2)
        >>> model.cfg.n_devices, str(model.blocks[1].attn.W_Q.device)
        (1, 'cpu')
    """
    if len(devices) != len(model.blocks):
        raise InvalidArgumentError(
            f"Expected one device per block ({len(model.blocks)}); got {len(devices)}."
        )
    first, last = devices[0], devices[-1]
    for name in ("embed", "hook_embed", "pos_embed", "hook_pos_embed"):
        if hasattr(model, name):
            getattr(model, name).to(first)
    for block, device in zip(model.blocks, devices, strict=True):
        block.to(device)
    for name in ("ln_final", "unembed"):
        if hasattr(model, name):
            getattr(model, name).to(last)
    distinct = sorted({str(d) for d in devices})
    model.cfg.device = str(first)
    model.cfg.n_devices = len(distinct) if first.type == "cuda" else 1
    return model
