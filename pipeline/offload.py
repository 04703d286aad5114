"""``runtime.offload``: how a stage's models share the GPU, trading speed for memory.

* ``none``: every module on the execution device (fastest).
* ``model``: each module stays on the CPU and moves whole to the execution device when it runs; the
  previous module in execution order goes back to the CPU then. At most one of them (plus the
  ``resident`` ones) is on the GPU at a time, and :meth:`Placement.offload` frees the last one.
* ``sequential``: the weights stay on the CPU and each layer's weights are copied in just for its own
  forward (the parameters themselves are on the meta device): least memory, slowest.

The stage packages call :func:`place_modules` with their modules in execution order; a model's
``device`` must then be :func:`execution_device`, not its parameters' device (CPU or meta under offload).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import cpu_offload, cpu_offload_with_hook
from accelerate.hooks import UserCpuOffloadHook
from torch import nn

from pipeline.config import OFFLOAD_MODES, OffloadMode


@dataclass
class Placement:
    """Where :func:`place_modules` put a model's modules; it keeps the ``model`` hooks alive."""

    mode: OffloadMode
    execution_device: torch.device
    hooks: tuple[UserCpuOffloadHook, ...] = ()  # "model": one per module, in execution order

    def offload(self) -> None:
        """Under ``model``, move every module back to the CPU (the end of a call, like diffusers'
        ``maybe_free_model_hooks``); a no-op for ``none`` and ``sequential``."""
        for hook in self.hooks:
            hook.offload()


def place_modules(
    modules: Sequence[nn.Module],
    device: torch.device | str,
    mode: OffloadMode = "none",
    resident: Sequence[nn.Module] = (),
) -> Placement:
    """Put ``modules`` (in execution order) on ``device`` as ``mode`` says; ``resident`` modules (small
    ones that the others call into, which no hook of their own would move) stay on ``device`` under
    ``model`` and are offloaded like the rest under ``sequential``.

    Cast the modules to their dtype first: offloaded weights keep the dtype they had.
    """
    # Following diffusers' DiffusionPipeline.enable_model_cpu_offload / enable_sequential_cpu_offload,
    # on accelerate's big_modeling cpu_offload_with_hook / cpu_offload.
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"runtime.offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # With its index, so the hooks see that a module already on it needs no transfer.
        device = torch.device("cuda", torch.cuda.current_device())
    if mode == "none":
        for module in (*modules, *resident):
            module.to(device)
        return Placement(mode, device)
    if mode == "sequential":
        for module in (*modules, *resident):
            # Buffers offload too only where the module holds parameters of its own (as diffusers does).
            own_parameters = next(module.parameters(recurse=False), None) is not None
            cpu_offload(module, execution_device=device, offload_buffers=own_parameters)
        return Placement(mode, device)
    hooks: list[UserCpuOffloadHook] = []
    for module in modules:
        _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hooks[-1] if hooks else None)
        hooks.append(hook)
    for module in resident:
        module.to(device)
    return Placement(mode, device, tuple(hooks))


def execution_device(module: nn.Module) -> torch.device | None:
    """The device an offloaded ``module`` runs on, read from its accelerate hooks (None without any):
    what the hooks will really do, for checks; the models report their :class:`Placement`'s.

    Following diffusers' ``DiffusionPipeline._execution_device``.
    """
    for submodule in module.modules():
        device = getattr(getattr(submodule, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


__all__ = ["Placement", "execution_device", "place_modules"]
