"""The named scale rules, checked by hand and against their definitions."""

import pytest
import torch

from lowbit.primitives.rules import (
    FLOAT8_ROW_EPS,
    INT4_MAXABS_EPS,
    float8_row_scale,
    float8_then_int4,
    int4_maxabs_group_scale,
)


def test_float8_then_int4_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    q, gs, rs = float8_then_int4(w, group_size=2)
    # float8 step: row amax 3 -> row scale 3 / 448; w / rs = [149.33, -298.67, 74.67, 448] rounds
    # in e4m3fn (steps 16, 32, 8, 32 in those binades) to [144, -288, 72, 448]
    assert torch.equal(rs, torch.tensor([[3.0 / 448]]))
    # int4 step: group amax 288 -> scale 36: [4, -8]; group amax 448 -> scale 56: [72/56 -> 1, 8 -> clamped 7]
    assert torch.equal(gs, torch.tensor([[36.0, 56.0]]))
    assert torch.equal(q, torch.tensor([[4, -8, 1, 7]], dtype=torch.int8))


def test_eps_of_each_step():
    w = torch.zeros(2, 4)
    q, gs, rs = float8_then_int4(w, group_size=4)
    assert torch.equal(rs, torch.full((2, 1), FLOAT8_ROW_EPS) / 448)
    assert torch.equal(gs, torch.full((2, 1), INT4_MAXABS_EPS / 8))
    assert not q.any()


def test_matches_its_definition():
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.logspace(-3, 1, 16).unsqueeze(1)
    q, gs, rs = float8_then_int4(w, 64)
    row_amax = w.abs().amax(dim=1, keepdim=True)
    assert torch.equal(rs, row_amax / 448)
    w8 = (w / rs).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    group_amax = w8.reshape(16, 4, 64).abs().amax(-1)
    assert torch.equal(gs, group_amax / 8)
    want = torch.clamp(torch.round(w8.reshape(16, 4, 64) / gs.unsqueeze(-1)), -8, 7).reshape(16, 256)
    assert torch.equal(q.float(), want)
    assert q.dtype == torch.int8 and int(q.min()) == -8  # max-abs: the largest negative magnitude reaches -8


def test_single_rules_and_errors():
    w = torch.tensor([[1.0, -4.0, 2.0, 0.0]])
    assert torch.equal(int4_maxabs_group_scale(w, 2), torch.tensor([[0.5, 0.25]]))
    assert torch.equal(float8_row_scale(w, torch.float8_e5m2), torch.tensor([[4.0 / 57344]]))
    with pytest.raises(ValueError, match="group_size=3 must be a positive int dividing in_features=4"):
        int4_maxabs_group_scale(w, 3)
    with pytest.raises(ValueError, match="2-D"):
        float8_row_scale(torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        float8_then_int4(torch.tensor([[float("nan"), 1.0]]), 2)
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        float8_row_scale(w, torch.int8)
