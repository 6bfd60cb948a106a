"""One place where kernels are launched, so that a test can compile every kernel variant for the
target GPU on a machine without one (``compile_only``): Triton's interpreter checks what a
kernel computes, this checks that the compiler accepts it (type rules the interpreter skips)."""

from __future__ import annotations

import contextlib
import contextvars

import torch
import triton

_target: contextvars.ContextVar = contextvars.ContextVar("compile_target", default=None)
compiled: list[str] = []  # names of kernels compiled under compile_only, in order

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
          torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def compiling() -> bool:
    """Whether launches only compile (inside :func:`compile_only`)."""
    return _target.get() is not None


def launch(kernel, grid: tuple[int, ...], args: tuple, num_warps: int = 4, num_stages: int | None = None,
           maxnreg: int | None = None, **meta) -> None:
    """``meta``: the kernel's constexprs; the other keywords are compiler options (None: Triton's default)."""
    target = _target.get()
    options = {k: v for k, v in dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg).items()
               if v is not None}
    if target is None:
        kernel[grid](*args, **options, **meta)
        return
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: _type(v) for n, v in zip(names, args)}
    signature.update({n: "constexpr" for n in meta})
    constexprs = {(names.index(n),): v for n, v in meta.items()}
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target, options=options)
    compiled.append(kernel.__name__)


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Inside, launches compile for CUDA compute capability ``arch`` instead of running."""
    from triton.backends.compiler import GPUTarget

    token = _target.set(GPUTarget("cuda", arch, 32))
    try:
        yield compiled
    finally:
        _target.reset(token)
