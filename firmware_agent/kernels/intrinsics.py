"""LLVM intrinsics the kernels use: single instructions numba has no Python spelling for.

This module imports numba and llvmlite, so kernel modules reach it through
:func:`firmware_agent.kernels.compiler_module`: only where kernels are compiled.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["acquire_fence", "load_u64le", "release_fence"]


@intrinsic
def load_u64le(typingctx: object, buf: types.Array, pos: types.Integer) -> tuple[object, object]:
    """The 8 bytes buf[pos:pos+8] as a little-endian word, in one unaligned load.

    No bounds check: every caller keeps pos + 8 within the current frame. (The agent runs
    on little-endian machines only: x86-64 and 64-bit ARM.)
    """

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        array = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(array.data, [args[1]])
        return builder.load(builder.bitcast(ptr, ir.IntType(64).as_pointer()), align=1)

    return types.uint64(buf, pos), codegen


def _fence_intrinsic(ordering: str) -> Any:
    """An intrinsic that emits an LLVM ``fence`` of ``ordering`` (a compiler barrier on x86, a
    ``dmb`` on ARM)."""

    def fence(typingctx: object) -> tuple[object, object]:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            builder.fence(ordering)
            return context.get_dummy_value()

        return types.void(), codegen

    fence.__name__ = f"_fence_{ordering}"
    return intrinsic(fence)


acquire_fence = _fence_intrinsic("acquire")
release_fence = _fence_intrinsic("release")
