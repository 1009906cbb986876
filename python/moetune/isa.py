"""The engine's ISAs as data: `moetune.isas()` lists every ISA the engine was
built with, in its table's order (slowest to fastest; `Context(isa="auto")`
picks the last runnable one), straight from the C++ table
(csrc/kernels/isa_table.def), so tests, docs and tools read it instead of
re-typing the list."""

from __future__ import annotations

import dataclasses

from moetune import _moetune_ext as _ext


@dataclasses.dataclass(frozen=True)
class IsaInfo:
    """One ISA: `name` is what `Context(isa=...)` takes; `runnable` whether this
    CPU/OS runs it; `required_features` every CPU/OS feature its kernels need
    (`missing_features`: those this machine lacks); `compile_flags` its own
    translation units' flags; `kernels` which code it runs: the GEMM kernel's
    name and the ISA whose W^T repack (`transpose`), element-wise set
    (`eltwise`) and `dequant` it shares."""

    name: str
    runnable: bool
    required_features: tuple[str, ...]
    missing_features: tuple[str, ...]
    compile_flags: tuple[str, ...]
    kernels: dict[str, str]


def isas() -> list[IsaInfo]:
    """Every ISA of the engine, slowest first (`scalar`, the reference, first)."""
    return [
        IsaInfo(
            name=r["name"],
            runnable=bool(r["runnable"]),
            required_features=tuple(r["required_features"]),
            missing_features=tuple(r["missing_features"]),
            compile_flags=tuple(r["compile_flags"]),
            kernels=dict(r["kernels"]),
        )
        for r in _ext.isas()
    ]


def cpu_features() -> tuple[str, ...]:
    """The CPU/OS features the engine detected on this machine (names as in
    `IsaInfo.required_features`)."""
    return tuple(_ext.cpu_features())
