"""moetune.isas(): the engine's ISA table as Python data, and what it must agree
with (Context construction, auto selection, Context.info(), `moetune info`)."""

from __future__ import annotations

import pytest
from op_cases import moetune


def test_table_shape():
    isas = moetune.isas()
    names = [i.name for i in isas]
    assert len(names) == len(set(names)) and "auto" not in names
    assert names[0] == "scalar", "the scalar reference comes first"
    scalar = isas[0]
    assert scalar.runnable and scalar.required_features == () and scalar.compile_flags == ()
    for i in isas:
        assert set(i.kernels) == {"gemm", "transpose", "eltwise", "dequant"}, i
        for part in ("transpose", "eltwise", "dequant"):
            assert i.kernels[part] in names, (i.name, part)
        assert all(f.startswith("-m") for f in i.compile_flags), i
        if i.name != "scalar":
            assert i.compile_flags, i.name


def test_runnable_agrees_with_the_detected_features():
    have = set(moetune.cpu_features())
    for i in moetune.isas():
        assert set(i.missing_features) == set(i.required_features) - have, i
        assert i.runnable == (not i.missing_features), i


def test_requirements_cover_the_code_each_isa_runs():
    by_name = {i.name: i for i in moetune.isas()}
    for i in by_name.values():
        for part in ("transpose", "eltwise", "dequant"):
            assert set(by_name[i.kernels[part]].required_features) <= set(i.required_features), (i.name, part)
    # Issue 10, defect 2: AMX runs AVX512-BF16 (K tails, small-r LoRA) and AVX-512 BW code.
    amx = set(by_name["amx_bf16"].required_features)
    assert {
        "amx_tile",
        "amx_bf16",
        "os_tile_state",
        "amx_permission",
        "avx512_bf16",
        "avx512bw",
        "avx512f",
        "os_zmm_state",
    } <= amx
    assert set(by_name["avx512_bf16"].required_features) <= amx


@pytest.mark.parametrize("isa", [i.name for i in moetune.isas()])
def test_context_constructs_exactly_the_runnable_isas(isa):
    info = next(i for i in moetune.isas() if i.name == isa)
    if info.runnable:
        ctx = moetune.Context(num_threads=1, isa=isa)
        assert ctx.isa == isa
        assert ctx.info()["kernel"] == info.kernels["gemm"]
        assert ctx.info()["kernels"] == info.kernels
    else:
        with pytest.raises(RuntimeError) as e:
            moetune.Context(num_threads=1, isa=isa)
        msg = str(e.value)
        assert f"'{isa}' cannot run" in msg, msg
        assert " ".join(info.missing_features) in msg, msg


def test_auto_is_the_last_runnable():
    runnable = [i.name for i in moetune.isas() if i.runnable]
    assert moetune.Context(num_threads=1).isa == runnable[-1]


def test_moetune_info_lists_every_isa(capsys):
    from moetune.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for i in moetune.isas():
        assert f"  {i.name} " in out, out
        assert ("runs here" if i.runnable else "lacks " + " ".join(i.missing_features)) in out
