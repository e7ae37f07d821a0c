"""Shared fixtures; the report header names the versions of the libraries under test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_report_header(config: pytest.Config) -> list[str]:
    import tifffile
    import zmq

    return [f"torch {torch.__version__}, numpy {np.__version__}, pyzmq {zmq.__version__}, "
            f"tifffile {tifffile.__version__}, threads {torch.get_num_threads()}"]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or a clean skip where it is absent."""
    if not (SHARED / "fmd" / "raw").is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault matrix recorded by the fault tests: frames in / out / written / flagged."""
    from tests.streamkit import FAULT_ROWS

    if not FAULT_ROWS:
        return
    tr = terminalreporter
    tr.section("fault matrix (frames)")
    tr.write_line(f"{'fault':<52} {'in':>5} {'out':>5} {'written':>8} {'flagged':>7}  note")
    for r in FAULT_ROWS:
        tr.write_line(f"{r['fault']:<52} {r['in']:>5} {r['out']:>5} {r['written']!s:>8} {r['flagged']:>7}  {r['note']}")
