"""Calling a Triton kernel with little host work: the launch arguments of a plan, prepared once.

``kernel[grid](*args, **constexprs)`` costs more than it looks on the host: ``__getitem__`` builds a
closure per call, and a dozen constexprs passed by keyword build a dict per call (~2 us for 15 of
them, per launch). A launcher that caches its plan prepares, once per plan, the constexprs as a
positional tail in the kernel's parameter order and keeps only the launch options (``num_warps``,
``num_stages``, ...) as keywords; each call is then ``kernel.run(*args, *tail, grid=grid,
warmup=False, **options)``, the entry ``kernel[grid]`` itself calls. The kernel sees exactly the same
arguments (Triton's binder maps both forms to the same parameters).
"""

from __future__ import annotations


def positional_constexprs(kernel, kwargs: dict) -> tuple[tuple, dict]:
    """``(tail, options)``: the values of ``kwargs`` that name kernel parameters, in parameter order,
    and the remaining keywords (launch options). The named parameters must be the last ones of the
    kernel's signature (every kernel here declares its constexprs last); otherwise the keywords are
    kept as they are: ``((), kwargs)``."""
    names = list(kernel.arg_names)
    params = {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    tail_names = names[len(names) - len(params):] if params else []
    if set(tail_names) != set(params):
        return (), dict(kwargs)
    return tuple(params[n] for n in tail_names), options
