"""Fixtures shared by the objective tests."""

import sys

import pytest

from lightbsr.objectives import TeacherObjective


@pytest.fixture(params=["batched", "per_view_calls"])
def teacher_path(request, monkeypatch):
    """Each of `TeacherObjective`'s two equal paths, forced whatever the batch size: both must pass the same bars."""
    threshold = sys.maxsize if request.param == "batched" else 0
    monkeypatch.setattr(TeacherObjective, "PER_VIEW_CALLS_MIN_PIXELS", threshold)
    return request.param
