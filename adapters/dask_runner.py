"""The Dask edge (extra `[dask]`): denoise a stored stack on a cluster, planes read and written by the workers.

The client learns each channel once (`learn_channels`, as the single-process path does) and ships
the networks (~14 KB each, as numpy weights) to every worker; tasks are blocks of planes that a
worker reads from the input store (OME-Zarr, or the pages of a TIFF), denoises with
`offline.denoise_plane` and writes to the output OME-Zarr, one chunk per plane: nothing is gathered
through the client but a count per block. A lost worker's blocks are rerun by Dask (`retries`,
idempotent writes), so the output is complete and the same as a single-process run. Dask moves
tasks between its processes with pickle: use it on a cluster you trust (Dask's TLS for others).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..offline import ANCHOR_SIGMA, STACK_TTA, StackDenoiser, channel_axis, denoise_plane, learn_channels
from .files import ImageInfo
from .ngff import NgffWriter, is_zarr, read_ngff

__all__ = ["BLOCK_PLANES", "ShippedNet", "denoise_block", "run_on_dask", "ship"]

log = logging.getLogger(__name__)

BLOCK_PLANES = 8  # planes per task: a worker holds about this many planes at once, whatever the stack size
RETRIES = 3  # per task, on top of Dask's own rescheduling of a lost worker's tasks


@dataclass(frozen=True)
class ShippedNet:
    """A learnt channel network as a worker rebuilds it: weights (numpy), input channels, TTA, anchoring."""

    n_chan: int
    weights: dict[str, np.ndarray]
    tta: int = STACK_TTA
    anchor_sigma: float = ANCHOR_SIGMA

    def build(self) -> Any:
        """The network on the worker's CPU (float32, eval mode)."""
        import torch

        from ..model import FM2SNet

        net = FM2SNet(self.n_chan)
        net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.weights.items()})
        return net.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]


def ship(denoiser: StackDenoiser) -> dict[int, ShippedNet]:
    """Every learnt channel of `denoiser` as a ShippedNet."""
    return {c: ShippedNet(t.net.n_chan, {k: v.detach().cpu().numpy() for k, v in t.net.state_dict().items()},
                          denoiser.tta, denoiser.anchor_sigma) for c, t in denoiser.trainers.items()}


_BUILT: dict[tuple[int, int], Any] = {}  # per worker process: (id of the shipped dict, channel) -> network


def _reader(src: str) -> Callable[[tuple[int, ...], int], np.ndarray]:
    """plane(index, number) from the input store: OME-Zarr level 0, or the TIFF's pages in order."""
    path = Path(src)
    if is_zarr(path):
        array = read_ngff(path)[0]
        return lambda index, _n: np.asarray(array[index])
    import tifffile

    tif = tifffile.TiffFile(path)
    pages = tif.series[0].pages
    return lambda _index, n: pages[n].asarray()  # type: ignore[union-attr]


def _warm_worker() -> int:
    """(On a worker) import torch (this module brings the engine), one thread: paid before the timed blocks."""
    import torch

    torch.set_num_threads(1)
    return torch.get_num_threads()


def denoise_block(src: str, dst: str, shape: tuple[int, ...], axes: str, numbers: list[int],
                  nets: dict[int, ShippedNet]) -> int:
    """(On a worker) read, denoise and write planes `numbers` (C-order plane numbers); returns how many."""
    import torch

    torch.set_num_threads(1)  # one core per worker process
    read = _reader(src)
    out = NgffWriter.attach(Path(dst), shape, axes)
    c_axis = channel_axis(axes, len(shape))
    for n in numbers:
        index = tuple(int(i) for i in np.unravel_index(n, shape[:-2]))
        channel = index[c_axis] if c_axis is not None else 0
        key = (id(nets), channel)
        if key not in _BUILT:
            _BUILT[key] = nets[channel].build()
        out.write_plane(index, denoise_plane(_BUILT[key], read(index, n), nets[channel].tta,
                                             nets[channel].anchor_sigma))
    return len(numbers)


def run_on_dask(src: Path, dst: Path, data: Any, axes: str, info: ImageInfo, denoiser: StackDenoiser,
                workers: int = 0, scheduler: str | None = None, overwrite: bool = False,
                say: Callable[[str], None] = print) -> dict[str, Any]:
    """Denoise stack `src` (its lazy `data`) into OME-Zarr `dst` on a LocalCluster of `workers` or at `scheduler`.

    Channels `denoiser` has not learnt yet are learnt here. Returns timings and counts. The output
    store and its metadata are made first; `fm2s.complete` is set only when every block is done.
    """
    from dask.distributed import Client, LocalCluster, as_completed

    if not log.isEnabledFor(logging.DEBUG):  # Dask logs every connection at INFO; our progress lines suffice
        logging.getLogger("distributed").setLevel(logging.WARNING)
    shape = tuple(int(s) for s in data.shape)
    writer = NgffWriter(dst, shape, np.dtype(data.dtype), axes, info, overwrite=overwrite)
    t0 = time.perf_counter()
    c_axis = channel_axis(axes, len(shape))
    channels = [c for c in (range(shape[c_axis]) if c_axis is not None else [0]) if c not in denoiser.trainers]
    learn_channels(data, axes, denoiser, channels, learnt=lambda c, p: say(f"channel {c} learnt on plane {p} "
                                                                           f"({time.perf_counter() - t0:.1f} s)"))
    learn_s = time.perf_counter() - t0
    nets = ship(denoiser)
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        n_workers = len(client.scheduler_info().get("workers", {}))
        say(f"dask: {n_workers} worker(s) at {client.scheduler_info().get('address')}")
        client.run(_warm_worker)
        shipped = client.scatter([nets], broadcast=True)[0]  # (a dict alone would be scattered key by key)
        total = writer.total
        blocks = [list(range(i, min(i + BLOCK_PLANES, total))) for i in range(0, total, BLOCK_PLANES)]
        t1 = time.perf_counter()
        futures = [client.submit(denoise_block, str(src), str(dst), shape, axes, b, shipped, retries=RETRIES,
                                 pure=False, key=f"fm2s-block-{i}-{dst.name}") for i, b in enumerate(blocks)]
        done = 0
        for future in as_completed(futures):
            done += future.result()
            rate = done / max(time.perf_counter() - t1, 1e-9)
            say(f"{done}/{total} planes, {rate:.1f}/s, ETA {(total - done) / max(rate, 1e-9):.0f} s")
        run_s = time.perf_counter() - t1
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    writer.finish()
    return {"planes": total, "learn_s": round(learn_s, 2), "run_s": round(run_s, 2), "workers": n_workers,
            "planes_per_s": round(total / max(run_s, 1e-9), 2)}
