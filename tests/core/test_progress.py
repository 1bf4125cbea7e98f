"""Progress: bars on a terminal, one plain line per step otherwise (cluster logs), nothing when quiet; always logged."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from compress.engine.progress import Reporter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=200), buffer


def test_plain_lines_when_not_a_terminal_with_time_left(caplog):
    out, buffer = console(terminal=False)
    clock = FakeClock()
    reporter = Reporter(out, clock=clock)
    with caplog.at_level(logging.INFO, logger="compress"), reporter.task("gptq", total=20, unit="layer") as advance:
        for _ in range(20):
            clock.now += 2.0
            advance(1)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 10  # throttled to about ten lines per task, whatever the layer count
    assert lines[0] == "gptq: 2/20 layers, 4.0s elapsed, ~36.0s left"
    assert lines[-1] == "gptq: 20/20 layers, 40.0s elapsed, ~0.0s left"
    assert "\x1b[" not in buffer.getvalue()  # no escape codes in log files
    assert [r.getMessage() for r in caplog.records][-1] == lines[-1]


def test_plain_lines_spell_the_plural(caplog):
    out, buffer = console(terminal=False)
    with caplog.at_level(logging.INFO, logger="compress"), Reporter(out, clock=FakeClock()).task(
            "calibration inputs", total=1, unit="batch") as advance:
        advance(1)
    assert buffer.getvalue().splitlines()[-1].startswith("calibration inputs: 1/1 batches,")


def test_quiet_prints_nothing_but_still_logs(caplog):
    out, buffer = console(terminal=False)
    reporter = Reporter(out, enabled=False)
    with caplog.at_level(logging.INFO, logger="compress"):
        with reporter.task("eval", total=3, unit="window") as advance:
            advance(3)
        reporter.note("out of memory at model.layers.1: retrying with calibration batches of 4 windows")
    assert buffer.getvalue() == ""
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("eval: 3/3 windows") for m in messages)
    assert any("retrying with calibration batches" in m for m in messages)


def test_bars_on_a_terminal_show_time_remaining():
    out, buffer = console(terminal=True)
    reporter = Reporter(out)
    assert reporter.bars
    with reporter.task("gptq", total=4, unit="layer") as advance:
        advance(2)
        out.file.flush()
    assert "eta" in buffer.getvalue() and "2/4" in buffer.getvalue()
