"""KeepPlan facts that every layer asks for at every decode step must not touch the device."""
from __future__ import annotations

import torch

from mmeff.hosts import token_plan as tp


class _NoRead(torch.Tensor):
    """A tensor whose reductions fail: stands for a CUDA tensor whose read-back would sync."""

    def any(self, *args, **kwargs):  # noqa: D102
        raise AssertionError("has_fillers read the filler mask back from the device")


def test_build_plan_knows_fillers_on_the_host() -> None:
    ragged = tp.build_plan([torch.tensor([0, 2, 3]), torch.tensor([1, 3])], length=4, dropped=[1, 2])
    even = tp.build_plan([torch.tensor([0, 2]), torch.tensor([1, 3])], length=4, dropped=[2, 2])
    for plan, expected in ((ragged, True), (even, False)):
        assert plan.fillers_present is expected
        plan.filler = plan.filler.as_subclass(_NoRead)
        assert plan.has_fillers is expected  # answered from the host-side flag
    assert ragged.filler[1].tolist() == [True, False, False]


def test_plan_without_flag_reads_once() -> None:
    plan = tp.KeepPlan(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[True, False]]), 3, torch.tensor([1]))
    assert plan.has_fillers is True
    plan.filler = plan.filler.as_subclass(_NoRead)
    assert plan.has_fillers is True  # cached after the first read
