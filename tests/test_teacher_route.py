"""fastkd.TeacherRoute (RCO): the anchor switches at the scheduled steps, anchors load lazily (one in memory), a
resumed Distiller continues on the anchor its step names, and bad routes are refused."""

import pytest
import torch

import fastkd
from fastkd import TeacherRoute


def anchors(count):
    out = []
    for i in range(count):
        torch.manual_seed(i)
        out.append({k: v.clone() for k, v in torch.nn.Linear(3, 4).state_dict().items()})
    return out


def test_the_route_switches_at_the_scheduled_steps(tmp_path, monkeypatch):
    saved = anchors(3)
    paths = []
    for i, state in enumerate(saved[1:], start=1):
        paths.append(str(tmp_path / f"anchor{i}.pt"))
        torch.save(state, paths[-1])
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or original(*a, **k))
    route = TeacherRoute(torch.nn.Linear(3, 4), [saved[0], *paths], switch=[2, 5])
    student = torch.nn.Linear(3, 4)
    distiller = fastkd.Distiller(student, route)
    x = torch.randn(6, 3)
    seen = []
    for _ in range(7):
        distiller(x)
        seen.append(route.active)
        assert torch.equal(route.model.weight, saved[route.active]["weight"])
        distiller.advance_schedules()
    assert seen == [0, 0, 1, 1, 1, 2, 2]
    assert loads == paths  # each path read once, when the route reached it

    resumed = fastkd.Distiller(torch.nn.Linear(3, 4), TeacherRoute(torch.nn.Linear(3, 4), [saved[0], *paths], [2, 5]))
    resumed.load_state_dict(distiller.state_dict())  # schedule step 7
    resumed(x)
    assert resumed.teacher.active == 2


def test_equal_intervals_and_a_callable_switch():
    assert TeacherRoute.equal_intervals(4, 100) == [25, 50, 75]
    route = TeacherRoute(torch.nn.Linear(3, 4), anchors(2), switch=lambda step: int(step >= 10))
    assert [route.anchor_at(s) for s in (0, 9, 10, 50)] == [0, 0, 1, 1]
    bad = TeacherRoute(torch.nn.Linear(3, 4), anchors(2), switch=lambda step: 5)
    with pytest.raises(ValueError, match="is not an anchor index"):
        bad.at_step(0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(anchors=[], switch=[]), "at least one checkpoint"),
        (dict(anchors=anchors(3), switch=[4]), "must list 2 steps"),
        (dict(anchors=anchors(3), switch=[5, 2]), "increasing ints"),
        (dict(anchors=[1.0], switch=[]), "state dict or a path"),
    ],
)
def test_bad_routes_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TeacherRoute(torch.nn.Linear(3, 4), **kwargs)
