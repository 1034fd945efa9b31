"""Launch configurations of backend "triton": the launch specs that each op file writes beside its
kernels (`Tuned`: an autotuned kernel's candidate table and shared-memory estimate; `Fixed`: a
row-wise kernel's one config), the candidate pruner, and the per-device autotuner cache.

Candidates are listed per group: "sm90" (H100/H200), "sm80" (A100; also used for other GPUs,
pruned by their shared memory) and IEEE, each row a Tile(group, meta, num_warps, num_stages).
A spec's `dims` names the size each meta-parameter tiles (a tile larger than that size, rounded
up to a power of two, is pruned); `operand` is the argument whose element size the shared-memory
estimate uses.
Group IEEE: the candidates for fp32 operands with exact IEEE dots (TF32 not allowed): those
dots run on FMA units, whose operand layouts replicate tiles per thread, and the tensor-core
sized tiles of the arch groups spill heavily there (ptxas, offline compile); these small tiles
do not. A kernel with an IEEE group runs exactly one of the two groups per call (the pruner
selects by Tile.group); a kernel without one runs its arch group for every dtype.
Under the interpreter (CPU tensors) a kernel runs with its spec's one small `interp` config:
autotuning there would only cost time.

Importing this module imports triton (the op files import it on the first launch).
"""
from typing import NamedTuple

import torch
import triton

from ._runtime import device_props, next_pow2

IEEE = "ieee"


class Tile(NamedTuple):
    group: str          # "sm90", "sm80" or IEEE
    meta: tuple         # values of the spec's `names`, in order
    num_warps: int
    num_stages: int


def tiles(group, rows):
    """Tiles of one group from rows (meta, num_warps, num_stages)."""
    return [Tile(group, meta, warps, stages) for meta, warps, stages in rows]


def _arch_group(capability):
    return "sm90" if capability[0] >= 9 else "sm80"


def _launch_key(meta, num_warps, num_stages):
    return tuple(sorted(meta.items())), num_warps, num_stages


class Tuned:
    """An autotuned kernel: `launch(device, grid, *args, **kwargs)` is kernel[grid](...) with the
    interpreter's config on CPU tensors, and on a GPU the autotuner over the candidates of the
    device's arch group (plus IEEE), built on first use per (capability, shared memory).

    names: the meta-parameters a Tile's meta gives, dims: the kernel argument each one tiles,
    operand: the argument whose element size counts, key: the autotune key (+ "PREC"),
    smem(meta, num_stages, args) -> bytes: the shared-memory estimate (args: the launch's named
    arguments plus "elt", the operand's element size), interp: the interpreter's meta."""

    def __init__(self, kernel, *, names, dims, operand, key, smem, interp, tiles):
        self.kernel, self.names, self.dims, self.operand = kernel, names, dims, operand
        self.key, self.smem, self.interp, self.tiles = list(key), smem, dict(interp), list(tiles)
        self._autotuned = {}

    def candidates(self, capability):
        """triton.Config candidates for a device: its arch group plus, when the kernel has one,
        its IEEE group (the pruner keeps exactly one of the two groups per call)."""
        groups = (_arch_group(capability), IEEE)
        return [triton.Config(dict(zip(self.names, t.meta)), num_warps=t.num_warps,
                              num_stages=t.num_stages)
                for t in self.tiles if t.group in groups]

    def pruner(self, smem_limit):
        """The early_config_prune function for a device with smem_limit bytes per block."""
        tiled = dict(zip(self.names, self.dims))
        # The groups each launch configuration is listed in (a config is matched to its Tile by
        # its launch parameters: triton passes the pruner Config objects, which carry no group).
        groups_of = {}
        for t in self.tiles:
            key = _launch_key(dict(zip(self.names, t.meta)), t.num_warps, t.num_stages)
            groups_of.setdefault(key, set()).add(t.group)
        has_ieee = any(t.group == IEEE for t in self.tiles)

        def in_group(cfg, ieee):
            groups = groups_of.get(_launch_key(cfg.kwargs, cfg.num_warps, cfg.num_stages), set())
            return IEEE in groups if ieee else bool(groups - {IEEE})

        def prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}
            operand = named_args[self.operand]
            args["elt"] = operand.element_size()
            if has_ieee:  # the IEEE group for exact fp32 dots, the arch group otherwise
                ieee = operand.dtype == torch.float32 and args.get("PREC") == "ieee"
                configs = [c for c in configs if in_group(c, ieee)]

            def fits(cfg):
                for meta_name, size in cfg.kwargs.items():
                    dim = args.get(tiled.get(meta_name))
                    if dim is not None and size > max(16, next_pow2(dim)):
                        return False
                return self.smem(cfg.kwargs, cfg.num_stages, args) <= smem_limit

            kept = [cfg for cfg in configs if fits(cfg)]
            if not kept:  # keep the candidate with the least shared memory
                kept = [min(configs, key=lambda c: self.smem(c.kwargs, c.num_stages, args))]
            return kept
        return prune

    def autotuned(self, device):
        """The triton.autotune wrapper of the kernel for a CUDA device (cached)."""
        capability, _, smem = device_props(device)
        if (capability, smem) not in self._autotuned:
            self._autotuned[capability, smem] = triton.autotune(
                configs=self.candidates(capability), key=self.key + ["PREC"],
                prune_configs_by={"early_config_prune": self.pruner(smem)})(self.kernel)
        return self._autotuned[capability, smem]

    def launch(self, device, grid, *args, **kwargs):
        if device.type == "cpu":
            return self.kernel[grid](*args, **kwargs, **self.interp)
        return self.autotuned(device)[grid](*args, **kwargs)


class Fixed:
    """A kernel launched with one config (cheap, row-wise kernels: no autotuning): on a GPU
    `gpu` with `num_warps`, under the interpreter `interp`. `launch(device, grid, ...)` with
    grid(meta) -> the launch grid."""

    def __init__(self, kernel, *, gpu, num_warps, interp):
        self.kernel, self.gpu, self.num_warps, self.interp = kernel, dict(gpu), num_warps, dict(interp)

    def config(self, device):
        """(meta, num_warps) of a launch on `device`."""
        if device.type == "cpu":
            return dict(self.interp), 4
        return dict(self.gpu), self.num_warps

    def launch(self, device, grid, *args, **kwargs):
        meta, warps = self.config(device)
        return self.kernel[grid(meta)](*args, num_warps=warps, **kwargs, **meta)
