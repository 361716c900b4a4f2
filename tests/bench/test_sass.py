"""bench/sass.py's reading of an nvdisasm listing: instructions, their kinds, loops and the hot loop."""

from __future__ import annotations

from bench import sass

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R2.64] ;
        /*0040*/                   LDSM.16.M88.4 R8, [R6] ;
        /*0050*/                   HMMA.16816.F32 R4, R20, R8, R4 ;
        /*0060*/                   LDG.E.U16 R9, desc[UR4][R2.64] ;
        /*0070*/                   LDGDEPBAR ;
        /*0080*/               @P1 BRA `(.L_x_1) ;
.L_x_0:
.L_x_2:
        /*0090*/                   LDS R4, [R3] ;
        /*00a0*/                   FFMA R4, R4, R5, R6 ;
        /*00b0*/               @P2 BRA `(.L_x_2) ;
        /*00c0*/                   EXIT ;
"""


def test_instructions_and_where_labels_stand():
    ops, labels = sass.instructions(LISTING)
    assert len(ops) == 13 and ops[-1] == "EXIT"
    assert ops[2] == "LDG.E.128 R4, desc[UR4][R2.64]" and ops[1] == "BRA `(.L_x_0)"
    assert labels == {".L_x_1": 2, ".L_x_0": 9, ".L_x_2": 9}


def test_kinds_and_loops():
    ops, labels = sass.instructions(LISTING)
    assert sass.loops(ops, labels) == [(2, 8), (9, 11)]
    counts = sass.kinds(ops)
    assert (counts["LDG.128"], counts["LDGSTS"], counts["LDSM"], counts["HMMA"], counts["LDG other"]) == (1, 1, 1, 1, 1)
    assert (counts["LDS"], counts["FMA"]) == (1, 1)


def test_the_hot_loop_is_the_one_with_loads_and_mma():
    size, counts = sass.hot_loop(*sass.instructions(LISTING))
    assert size == 7 and counts["HMMA"] == 1 and counts["LDS"] == 0
