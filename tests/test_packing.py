import pytest
import torch

from omni_core import ops
from omni_core.ops.routing import build_routing_plan, routing_plan


def _batch(lengths=(3, 1, 5), D=4):
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(x=torch.randn(T, D), cu_seqlens=cu, modality=torch.randint(0, 3, (T,), dtype=torch.int32),
                position=torch.arange(T, dtype=torch.int32), max_seqlen=max(lengths))


def test_from_segments_and_unpack_round_trip():
    text, image, audio = torch.randn(4, 8), torch.randn(5, 8), torch.randn(7, 8)
    batch = ops.PackedBatch.from_segments([
        ops.Segment(0, text),
        [ops.Segment(0, text), ops.Segment(1, image)],  # joint text+image
        [ops.Segment(0, text[:2]), ops.Segment(2, audio, torch.tensor([0, 2, 3, 5, 8, 9, 11]))],
    ])
    assert batch.cu_seqlens.tolist() == [0, 4, 13, 22]
    assert batch.max_seqlen == 9
    assert batch.modality.tolist() == [0] * 4 + [0] * 4 + [1] * 5 + [0] * 2 + [2] * 7
    assert batch.position[8:13].tolist() == list(range(5))
    assert batch.position[15:].tolist() == [0, 2, 3, 5, 8, 9, 11]
    parts = batch.unpack()
    assert torch.equal(parts[1], torch.cat([text, image]))
    assert [s.length for s in batch.segments] == [4, 4, 5, 2, 7]


def test_routing_plan_groups_stably_and_is_reused():
    batch = ops.PackedBatch(**_batch((6, 9, 2)))
    plan = batch.plan
    ids = batch.modality[plan.perm]
    assert torch.all(ids[1:] >= ids[:-1])
    for m in range(3):
        start, end = plan.bounds(m)
        members = plan.perm[start:end]
        assert torch.all(members[1:] > members[:-1]), "stable: packed order kept inside a group"
        assert torch.all(batch.modality[members] == m)
    assert torch.equal(plan.perm[plan.inverse], torch.arange(17))
    assert routing_plan(batch.modality, 3) is plan, "one plan per batch, reused by every layer"


def test_native_and_torch_routing_agree(monkeypatch):
    modality = torch.randint(0, 3, (1001,))
    native = build_routing_plan(modality, 3)
    monkeypatch.setenv("OMNI_BACKEND", "reference")
    torch_plan = build_routing_plan(modality, 3)
    assert torch.equal(native.perm, torch_plan.perm)
    assert native.counts == torch_plan.counts


def test_routing_plan_modified_tensor_is_recomputed():
    modality = torch.tensor([0, 1, 2, 0])
    first = routing_plan(modality, 3)
    modality[0] = 2
    second = routing_plan(modality, 3)
    assert second is not first and second.counts == (1, 1, 2)


@pytest.mark.parametrize("change, message", [
    (dict(cu_seqlens=torch.tensor([0, 3, 4, 9], dtype=torch.int64)), "int32"),
    (dict(cu_seqlens=torch.tensor([0, 4, 3, 9], dtype=torch.int32)), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([1, 3, 4, 9], dtype=torch.int32)), "start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 3, 4, 8], dtype=torch.int32)), "add up to 8"),
    (dict(modality=torch.tensor([0, 1, 2, 3, 0, 0, 0, 0, 0], dtype=torch.int32)), r"\[0, 3\)"),
    (dict(modality=torch.zeros(9)), "integer"),
    (dict(position=torch.arange(9)), "int32"),
    (dict(max_seqlen=2), "max_seqlen"),
    (dict(x=torch.randn(9, 4, device="meta")), "different devices"),
])
def test_packed_batch_rejects_bad_input(change, message):
    fields = _batch((3, 1, 5))
    fields.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.PackedBatch(**fields)


def test_from_segments_rejects_bad_modality_and_positions():
    with pytest.raises(ValueError, match="modality id 5"):
        ops.PackedBatch.from_segments([ops.Segment(5, torch.randn(2, 3))])
    with pytest.raises(ValueError, match="position has shape"):
        ops.PackedBatch.from_segments([ops.Segment(0, torch.randn(2, 3), torch.arange(3))])
    with pytest.raises(ValueError, match="empty"):
        ops.PackedBatch.from_segments([])
