"""One place where kernels are launched, so that a test can compile every kernel variant for the
target GPU on a machine without one (``compile_only``): Triton's interpreter checks what a
kernel computes, this checks that the compiler accepts it (type rules the interpreter skips).
A compile-only build specialises on the arguments as a launch does (16-byte alignment, ints equal
to 1), so its machine code (``bench/sass_report.py``) is the code a launch with them would run.

It is also where the host's share of a launch is kept small. ``kernel[grid](...)`` binds and
specialises every argument and looks the compiled kernel up on each call (about 0.1 ms for the
decode kernel's ~40 arguments on the H100's host, more than the kernel itself at short
contexts); here the compiled kernel it returns is kept under a key of what Triton specialises on
(:func:`specialization`), and later calls with that key launch it directly.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import triton
from triton.compiler import CompiledKernel

_target: contextvars.ContextVar = contextvars.ContextVar("compile_target", default=None)
compiled: list[CompiledKernel] = []  # kernels compiled under compile_only, in order
_ready: dict[tuple, tuple] = {}  # launch key -> (compiled kernel, its constexpr values in parameter order)

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


def specialization(args: tuple) -> tuple:
    """What Triton's compiled code may depend on in the runtime ``args``, or finer: a tensor's dtype
    and 16-byte alignment; an int's being 1, a multiple of 16, within 32 bits; other types. Equal
    keys therefore imply the compiled kernel Triton would pick. (One pass, no call per argument:
    this runs on every launch.)"""
    tensor = torch.Tensor
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, tensor)
                 else (a == 1, a % 16 == 0, -(2**31) <= a < 2**31) if type(a) is int
                 else (type(a), a) if type(a) is bool else type(a)
                 for a in args)


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
        device = torch.cuda.current_device() if args[0].is_cuda else None  # Triton keeps kernels per device
        key = (kernel, device, tuple(meta.items()), tuple(options.items()), specialization(args))
        ready = _ready.get(key)
        if ready is None:
            done = kernel[grid](*args, **options, **meta)  # compiles (or finds) the kernel for this key
            if isinstance(done, CompiledKernel):  # not under Triton's interpreter
                _ready[key] = done, tuple(meta[n] for n in kernel.arg_names[len(args):])
        else:
            done, constexprs = ready
            done[(*grid, 1, 1)[:3]](*args, *constexprs)  # the compiled runner takes all three grid sizes
        return
    from triton.compiler import ASTSource

    if getattr(kernel, "is_gluon", lambda: False)():  # Gluon kernels keep their own front end
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    names = kernel.arg_names
    signature = {n: _type(v) for n, v in zip(names, args)}
    constexprs = {(names.index(n),): v for n, v in meta.items()}
    attrs = {}
    for i, (param, a) in enumerate(zip(kernel.params, args)):  # what a launch specialises on (see specialization)
        if param.do_not_specialize:
            continue
        if type(a) is int and a == 1:
            signature[names[i]], constexprs[(i,)] = "constexpr", 1
        elif isinstance(a, torch.Tensor) and a.data_ptr() % 16 == 0 or type(a) is int and a % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({n: "constexpr" for n in meta})
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled.append(triton.compile(source, target=target, options=options))


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Inside, launches compile for CUDA compute capability ``arch`` instead of running."""
    from triton.backends.compiler import GPUTarget

    token = _target.set(GPUTarget("cuda", arch, 32))
    try:
        yield compiled
    finally:
        _target.reset(token)
