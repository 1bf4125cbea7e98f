"""A run folder appears complete or not at all."""

import pytest

from compress.recipe.errors import UserError
from compress.engine.output import MARKER, atomic_output


def test_success_renames_into_place(tmp_path):
    target = tmp_path / "run"
    with atomic_output(target) as staging:
        (staging / "report.json").write_text("{}")
        assert not target.exists()
    assert (target / "report.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder, no lock file left behind


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_or_interrupt_leaves_nothing(tmp_path, exc):
    target = tmp_path / "run"
    with pytest.raises(type(exc)):
        with atomic_output(target) as staging:
            (staging / "report.json").write_text("{}")
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    target = tmp_path / "run"
    with atomic_output(target) as staging:
        (staging / "old").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        with atomic_output(target):
            pass
    assert (target / "old").read_text() == "keep me"
    with atomic_output(target, overwrite=True) as staging:
        (staging / "new").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new"]


def test_failed_overwrite_keeps_the_previous_run(tmp_path):
    target = tmp_path / "run"
    with atomic_output(target) as staging:
        (staging / "old").write_text("keep me")
    with pytest.raises(RuntimeError):
        with atomic_output(target, overwrite=True):
            raise RuntimeError("boom")
    assert (target / "old").read_text() == "keep me"
