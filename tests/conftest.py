"""Shared fixtures; the report header names the versions of the libraries and the package under test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _test_the_installed_package() -> None:
    """Import fm2s_stream from where it is installed, never from the checkout's folder of that name.

    `python -m pytest` puts the checkout first on sys.path, and its fm2s_stream/ lacks the adapters
    (installed as fm2s_stream.adapters from the top-level adapters/). A regular install (a wheel) is
    loaded from its site-packages explicitly; an editable install has no copy there (its finder maps
    the checkout itself, adapters included), so the checkout is what is tested.
    """
    root = Path(__file__).resolve().parents[1]
    for entry in sys.path:
        base = Path(entry or ".").resolve()
        init = base / "fm2s_stream" / "__init__.py"
        if base == root or not init.is_file() or not (init.parent / "adapters").is_dir():
            continue
        spec = importlib.util.spec_from_file_location("fm2s_stream", init,
                                                      submodule_search_locations=[str(init.parent)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fm2s_stream"] = module
        spec.loader.exec_module(module)
        return


_test_the_installed_package()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_report_header(config: pytest.Config) -> list[str]:
    import tifffile
    import zmq

    import fm2s_stream

    return [f"torch {torch.__version__}, numpy {np.__version__}, pyzmq {zmq.__version__}, "
            f"tifffile {tifffile.__version__}, threads {torch.get_num_threads()}",
            f"fm2s_stream under test: {Path(fm2s_stream.__file__).parent}"]


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
