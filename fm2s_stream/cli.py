"""fm2s-stream: the command line (denoise, serve, demo, mm-demo, calibrate, send, receive, keys, state, view)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

log = logging.getLogger("fm2s_stream")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .pipeline import default_threads
    from .presets import preset_names

    p.add_argument("--preset", default="auto", choices=["auto", *preset_names()],
                   help="auto (default): noise calibrated on the data itself; or a paper preset")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed (denoise --method paper: the authors' 3407)")
    p.add_argument("--threads", type=int, default=default_threads(), help="torch CPU threads")


# -- denoise -------------------------------------------------------------------------------------------
def cmd_denoise(args: argparse.Namespace) -> int:
    """Denoise image files; returns the exit code (1 if any input failed, 130 if interrupted)."""
    import torch

    from .adapters.files import ImageFileError, check_output, read_stack, write_image
    from .devices import keep_host_memory
    from .offline import denoise, denoise_kept
    from .training import PAPER_SEED, SCHEDULES, Schedule

    torch.set_num_threads(args.threads)
    keep_host_memory()
    if getattr(args, "seed", 0) is None:
        args.seed = PAPER_SEED if args.method == "paper" else 0
    inputs = [Path(p) for p in args.inputs]
    out = Path(args.output)
    many = len(inputs) > 1
    if many and out.suffix:
        print(f"error: {len(inputs)} inputs need -o to be a directory, not {out}", file=sys.stderr)
        return 2
    try:
        check_output(out, many)
        if (args.workers or args.scheduler) and not _is_zarr(out):
            raise ImageFileError(f"{out}: --workers/--scheduler write OME-Zarr (give -o OUT.ome.zarr): "
                                 "the workers write planes in parallel")
        if (args.workers or args.scheduler) and args.average > 1:
            raise ImageFileError("--average needs the whole series in one process; drop --workers/--scheduler")
    except ImageFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for path in inputs:
        target = (out / path.name) if (many or out.is_dir()) else out
        try:
            data, axes, info = read_stack(path)
            args.names = _channel_names(data, axes, info, args.channel)
            t0 = time.perf_counter()
            if data.ndim > 2 and (args.workers or args.scheduler):
                _denoise_on_dask(path, target, data, axes, info, args)
            elif data.ndim > 2:
                code = _denoise_stack_file(path, target, data, axes, info, args)
                if code:
                    return code
            else:
                if target.exists() and not args.overwrite:
                    raise ImageFileError(f"{target}: exists; pass --overwrite to replace it")
                if args.state:
                    result, notes = denoise_kept(np.asarray(data), args.state, args.names[0], args.preset,
                                                 args.method, args.device, args.seed, init=args.init)
                    _say_notes(path, notes)
                else:
                    method: str | Schedule = args.method
                    if args.no_prior:
                        method = dataclasses.replace(SCHEDULES[args.method], prior_weight=0.0)
                    result = denoise(np.asarray(data), args.preset, method, args.device, args.seed, init=args.init)
                if _is_zarr(target):
                    from .adapters.ngff import NgffWriter

                    zarr_out = NgffWriter(target, result.shape, result.dtype, axes, info, overwrite=args.overwrite)
                    zarr_out.write(result)
                    zarr_out.finish()
                else:
                    write_image(target, result, overwrite=args.overwrite, axes=axes, info=info)
            print(f"{path} -> {target} ({'x'.join(map(str, data.shape))} {data.dtype}, "
                  f"{time.perf_counter() - t0:.1f} s)")
        except (ImageFileError, ValueError) as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
    return 1 if failures else 0


def _channel_names(data: Any, axes: str, info: Any, base: str) -> list[str]:
    """State names of a file's channels, by C index: OME names, else `<base>-<c>` (as `send` names them)."""
    from .adapters.files import channel_name
    from .offline import channel_axis

    c_axis = channel_axis(axes, data.ndim)
    if c_axis is None:
        return [base]
    return [channel_name(info.channel_names, c, base) for c in range(data.shape[c_axis])]


def _say_notes(path: Path, notes: dict[str, str]) -> None:
    """What happened to each channel's kept state (resumed, saved, or why not), on stderr."""
    for name, note in notes.items():
        print(f"{path.name}: channel {name!r}: {note}", file=sys.stderr)


def _is_zarr(path: Path) -> bool:
    return path.suffix.lower() == ".zarr"


def _denoise_on_dask(path: Path, target: Path, data: Any, axes: str, info: Any, args: argparse.Namespace) -> None:
    """A stack on a Dask cluster (LocalCluster of --workers, or --scheduler's); prints its summary."""
    try:
        from .adapters.dask_runner import run_on_dask
    except ImportError as exc:
        raise ValueError(f"--workers/--scheduler need Dask: pip install 'fm2s-stream[dask]' ({exc})") from None
    from .offline import StackDenoiser

    denoiser = StackDenoiser(args.preset, args.method, args.device, args.seed, tta=args.tta, init=args.init,
                             state_dir=args.state, names=args.names)
    summary = run_on_dask(path, target, data, axes, info, denoiser, workers=args.workers, scheduler=args.scheduler,
                          overwrite=args.overwrite, say=lambda line: print(f"{path.name}: {line}", file=sys.stderr))
    _say_notes(path, denoiser.notes)
    print(json.dumps({"dask": summary}))


class _Interrupted(Exception):
    """Ctrl-C during a channel's cold start (raised from its step callback)."""


def _denoise_stack_file(path: Path, target: Path, data, axes: str, info, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    """A stack plane by plane into `target` (OME-TIFF at the end); Ctrl-C keeps the planes done (exit 130)."""
    from .adapters.files import ImageFileError, StackWriter
    from .offline import StackDenoiser, iter_denoised

    if target.suffix.lower() == ".png":
        raise ImageFileError(f"{target}: PNG holds one 2D frame; write stacks as .tif or .ome.zarr")
    if _is_zarr(target):
        from .adapters.ngff import NgffWriter

        writer: Any = NgffWriter(target, data.shape, data.dtype, axes, info, resume=args.resume,
                                 overwrite=args.overwrite)
    else:
        writer = StackWriter(target, data.shape, data.dtype, axes, info, resume=args.resume, overwrite=args.overwrite)
    stop = threading.Event()

    def on_sigint(_sig: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        stop.set()
        print(f"\n{path.name}: stopping after the plane in flight (Ctrl-C again to abort)", file=sys.stderr)

    def on_step(_steps: int) -> None:
        if stop.is_set():
            raise _Interrupted

    def learnt(channel: int, plane: int) -> None:
        name = denoiser.name_of(channel)
        how = denoiser.notes.get(name, "")
        print(f"\r{path.name}: channel {channel} ({name}) {how if how.startswith('resumed') else 'learnt'} "
              f"on plane {plane} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        if how and not how.startswith("resumed"):
            print(f"{path.name}: channel {name!r}: {how}", file=sys.stderr)
        since[:] = [time.perf_counter(), writer.done]  # the rate (and ETA) counts planes after a cold start

    denoiser = StackDenoiser(args.preset, args.method, args.device, args.seed,
                             finetune_steps=args.finetune_steps, on_step=on_step, tta=args.tta, init=args.init,
                             state_dir=args.state, names=args.names)
    previous = signal.signal(signal.SIGINT, on_sigint)
    t0 = time.perf_counter()
    start = writer.done
    since: list[float] = [t0, start]
    if start:
        print(f"{path.name}: resuming at plane {start} of {writer.total}", file=sys.stderr)
    if args.average > 1:  # the average needs each series' future: denoise all, average, then write
        if args.resume and start:
            raise ImageFileError(f"{target}: --resume cannot continue an --average run; start it again")
        if len(axes) != data.ndim or "T" not in axes[:-2]:
            raise ImageFileError(f"{path}: --average needs a T axis; this stack's axes are {axes!r}")
    averaged = np.empty(data.shape, data.dtype) if args.average > 1 else None
    try:
        for index, plane in iter_denoised(data, axes, denoiser, start=start, learnt=learnt):
            if averaged is not None:
                averaged[index] = plane
            else:
                writer.write(plane)
            _stack_progress(path.name, writer.done if averaged is None else int(np.ravel_multi_index(
                index, data.shape[:-2])) + 1, writer.total, int(since[1]), since[0])
            if stop.is_set():
                break
        if averaged is not None and not stop.is_set():
            from .offline import average_stack

            print(f"{path.name}: averaging over up to {args.average} frames along T (past and future)",
                  file=sys.stderr)
            for plane in average_stack(data, averaged, axes, args.average).reshape(-1, *data.shape[-2:]):
                writer.write(plane)
    except _Interrupted:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    if writer.done < writer.total:
        writer.close()
        resume = "run the same command with --resume to finish it" if args.average <= 1 else "run it again"
        print(f"\ninterrupted: {target} holds {writer.done} of {writer.total} planes (in order); {resume}",
              file=sys.stderr)
        return 130
    writer.finish()
    return 0


def _stack_progress(name: str, done: int, total: int, start: int, t0: float) -> None:
    """One progress line: planes done, their rate since `t0` (when `start` were done), the ETA."""
    rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    bar = "#" * int(30 * done / total)
    print(f"\r{name} [{bar:<30s}] {done}/{total} planes, {rate:.1f}/s, ETA {eta:.0f} s ", end="" if done < total
          else "\n", file=sys.stderr)


# -- serve ---------------------------------------------------------------------------------------------
def _service_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .service import ServiceOptions

    return ServiceOptions(
        source=args.source, source_type=args.source_type, publish=args.publish, preview=args.preview,
        save=Path(args.save) if args.save else None, save_kind=args.save_kind, save_format=args.save_format,
        roll_every=args.roll_every,
        pixel_size_um=args.pixel_size, preset=args.preset, budget_ms=args.budget_ms,
        max_latency_ms=args.max_latency_ms, device=args.device,
        seed=args.seed, threads=args.threads, temporal=not args.no_temporal, average_frames=args.average,
        cold_start_steps=args.cold_start_steps, cold_start=args.cold_start, init=args.init,
        allow_remote=args.bind is not None and args.bind not in ("127.0.0.1", "localhost", "::1"),
        curve=Path(args.curve) if args.curve else None, state=Path(args.state) if args.state else None,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM, then drain, finalise files and print the final report."""
    from .service import StreamService

    try:
        service = StreamService(_service_options(args)).start()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"fm2s-stream serving {args.source} ({args.source_type}); Ctrl-C to stop", file=sys.stderr)
    while not stop.wait(args.status_every if args.status_every > 0 else 0.5):
        if args.status_every > 0:
            print("\r" + service.pipeline.status_line() + "   ", end="", file=sys.stderr, flush=True)
    print("\nstopping: draining queue and finalising files", file=sys.stderr)
    report = service.stop()
    print(json.dumps(report, default=str))
    return 0


# -- send / receive / keys -----------------------------------------------------------------------------
def _secure_client(sock, curve: str | None) -> None:  # type: ignore[no-untyped-def]
    """Make `sock` a CurveZMQ client when a key directory is given."""
    if curve:
        from .adapters.curve import CurveKeys, secure_client

        secure_client(sock, CurveKeys(curve))


def cmd_state(args: argparse.Namespace) -> int:
    """List what a state directory holds: channel, frames and steps learnt, when saved, noise parameters."""
    from .state import StateStore

    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"error: {directory} is not a directory", file=sys.stderr)
        return 2
    rows = StateStore(directory, read_only=True).entries()
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        return 0
    print(f"{'channel':<20} {'frames':>7} {'steps':>7} {'dtype':>5} {'shape':>11} {'saved':<19} "
          "noise (k_g k_p lambda_p)")
    for row in rows:
        if "problem" in row:
            print(f"{row['file']:<20} unusable: {row['problem']}")
            continue
        p = row.get("preset") or {}
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.get("saved_at", 0)))
        shape = "x".join(map(str, row.get("shape") or [])) or "-"
        print(f"{row.get('channel', '?')!s:<20} {row.get('frames_learnt', 0):>7} {row.get('steps', 0):>7} "
              f"{row.get('dtype', '-')!s:>5} {shape:>11} {saved:<19} "
              f"{p.get('k_g', 0):.1f} {p.get('k_p', 0):.1f} {p.get('lambda_p', 0):.1f}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Create CurveZMQ server and client key pairs (for `serve/send/receive --curve DIR`)."""
    from .adapters.curve import make_keys

    try:
        made = make_keys(args.directory)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(made))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    """Replay an image file's planes as wire-format frames on a PUSH (or PUB) socket."""
    import zmq

    from .adapters.files import FileSource, ImageFileError
    from .wire import encode

    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH if args.socket == "push" else zmq.PUB)
    sock.setsockopt(zmq.LINGER, 5000)
    if args.socket == "push":  # frames go only to a connected receiver: wait for one, at most --wait seconds
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDTIMEO, int(args.wait * 1000))
    try:
        _secure_client(sock, args.curve)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sock.connect(args.to)
    time.sleep(0.2)
    source = FileSource(args.file, channel=args.channel)
    t0, n = time.perf_counter(), 0
    try:
        for i, frame in enumerate(source.frames()):
            if args.fps > 0:
                time.sleep(max(0.0, t0 + i / args.fps - time.perf_counter()))
            frame.frame_id = args.first_id + i
            frame.ts = time.time()
            sock.send_multipart(encode(frame), copy=False)
            n += 1
    except ImageFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except zmq.Again:
        sock.close(linger=0)
        print(f"error: no receiver took a frame at {args.to} within {args.wait:g} s (is serve running?); "
              f"sent {n} frames, frame {args.first_id + n} onwards not sent", file=sys.stderr)
        return 1
    sock.close()
    print(f"sent {n} frames to {args.to}", file=sys.stderr)
    return 0


def cmd_receive(args: argparse.Namespace) -> int:
    """Capture wire-format frames (PULL or SUB) into a crash-safe TIFF, until N frames or Ctrl-C.

    serve's outputs (headers with "fm2s") go to received_denoised_NNN.ome.tif with each page's fm2s
    fields; raw frames to received_raw_NNN.ome.tif.
    """
    import zmq

    from .frame import Result
    from .tiffsink import TiffSink
    from .wire import WireError, decode

    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.PULL if args.socket == "pull" else zmq.SUB)
    if args.socket == "sub":
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        _secure_client(sock, args.curve)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sock.connect(args.from_)
    sink: TiffSink | None = None  # made at the first frame: "denoised" files for serve's outputs, else "raw"
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    got = bad = 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while not stop.is_set() and (args.count == 0 or got < args.count):
        if deadline and time.monotonic() > deadline:
            break
        if not sock.poll(100):
            continue
        parts = sock.recv_multipart(copy=False)
        try:
            frame = decode([p.buffer for p in parts])
            fm2s = json.loads(bytes(parts[0].buffer)).get("fm2s")
        except WireError as exc:
            bad += 1
            print(f"malformed message: {exc}", file=sys.stderr)
            continue
        got += 1
        if args.save and sink is None:
            sink = TiffSink(args.save, kind="denoised" if isinstance(fm2s, dict) else "raw", prefix="received")
            sink.open()
        if sink:
            fields = fm2s if isinstance(fm2s, dict) else {"status": "received"}
            sink.write(Result.from_processing(frame, fields))
    if sink:
        sink.close()
    sock.close(linger=0)
    print(json.dumps({"received": got, "malformed": bad, "files": sink.stats()["files"] if sink else []}))
    return 0


def cmd_mm_demo(args: argparse.Namespace) -> int:
    """Run the Micro-Manager demo (needs the `micromanager` extra)."""
    try:
        from .adapters.mm_demo import run_mm_demo
        from .demo import new_run_dir

        run = new_run_dir(Path(args.out))
        report = run_mm_demo(run, args.timepoints, preset=args.preset, threads=args.threads,
                             interval_s=args.interval, state_dir=Path(args.state) if args.state else None)
    except ImportError as exc:
        print(f"error: {exc}; install with: pip install 'fm2s-stream[micromanager]'", file=sys.stderr)
        return 2
    c = report["counts"]
    print(f"acquired {c.get('in', 0)} frames in {report['acquisition_s']:.1f} s; denoised {c.get('denoised', 0)}, "
          f"classical during cold start {c.get('bootstrap', 0)}, raw {c.get('raw', 0)}; "
          f"latency p50 {report['p50_ms']:.0f} ms p99 {report['p99_ms']:.0f} ms; "
          f"acquisition-thread time per frame {report['callback_ms_p50']:.2f} ms; files {report['files']['files']}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """One noise estimate for the frames of one field (all files, all planes), per channel: a table,
    or JSON with --json; --plot draws the photon-transfer curve."""
    from .adapters.files import ImageFileError, channel_name, read_stack
    from .calibrate import calibrate, calibration_table
    from .offline import channel_axis

    groups: dict[str, list[np.ndarray]] = {}
    try:
        for name in args.files:
            data, axes, info = read_stack(Path(name))
            c_axis = channel_axis(axes, data.ndim)
            for index in np.ndindex(*data.shape[:-2]):
                c = index[c_axis] if c_axis is not None else None
                key = channel_name(info.channel_names, c, "default")
                groups.setdefault(key, []).append(np.asarray(data[index]))
    except (ImageFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failures = 0
    for key, planes in groups.items():
        planes = planes[: args.max_frames]
        label = f"{', '.join(Path(f).name for f in args.files)}" + (f" [{key}]" if len(groups) > 1 else "")
        try:
            report = calibrate(planes, args.base, args.offset)
        except ValueError as exc:
            failures += 1
            print(f"error: {label}: {exc}", file=sys.stderr)
            continue
        if args.plot:
            from .figures import ptc_figure

            plot = Path(args.plot)
            if len(groups) > 1:
                plot = plot.with_name(f"{plot.stem}-{key}{plot.suffix}")
            ptc_figure(report, plot, f"photon transfer: {label}")
        if args.json:
            print(json.dumps({"files": args.files, "channel": key, **report}))
        else:
            print(f"{label}:")
            print(calibration_table(report))
            if args.plot:
                print(f"  curve              {plot}")
    return 1 if failures else 0


# -- parser --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    from .training import SCHEDULES

    ap = argparse.ArgumentParser(prog="fm2s-stream", description="Real-time zero-shot FM2S denoising.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    from .offline import OFFLINE_INIT, STACK_FINETUNE_STEPS, STACK_TTA

    p = sub.add_parser("denoise", help="denoise PNG/TIFF files (2D frames or stacks)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", required=True, help="output file (one input) or directory")
    p.add_argument("--method", default="fast", choices=sorted(SCHEDULES))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-prior", action="store_true",
                   help="2D frames: the network alone, without the block-matched prior it is averaged with "
                        "(~1.5 s less per 512x512 frame, ~30 s less at 2048x2048; README \"Quality\")")
    p.add_argument("--resume", action="store_true", help="finish a stack output left by Ctrl-C or a crash")
    p.add_argument("--finetune-steps", type=int, default=STACK_FINETUNE_STEPS,
                   help="stacks: training steps per plane after each channel's one cold start")
    p.add_argument("--init", default=None, choices=["generic", "random"],
                   help=f"where the network starts: the generic network shipped in the package, or random weights "
                        f"(default: {OFFLINE_INIT}; with --method paper, random as the authors')")
    p.add_argument("--state", default=None, metavar="DIR",
                   help="keep each channel's learnt network in DIR (the files serve keeps): a channel found "
                        "there is not learnt again")
    p.add_argument("--channel", default="default",
                   help="the state name of a file without channel names (channel c of a C axis: NAME-c)")
    p.add_argument("--tta", type=int, default=STACK_TTA, choices=(1, 2, 4, 8),
                   help="stacks: inference views (flips/rotations) averaged per plane")
    p.add_argument("--average", type=int, default=1, metavar="N",
                   help="stacks with a T axis: registered temporal average over up to N frames, past and "
                        "future (1 = off; holds the stack in memory)")
    p.add_argument("--workers", type=int, default=0,
                   help="stacks: run on a Dask LocalCluster of N worker processes (output: OME-Zarr)")
    p.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                   help="stacks: run on an existing Dask cluster (output: OME-Zarr)")
    _add_model_args(p)
    p.set_defaults(seed=None)  # 0, or the authors' seed with --method paper (cmd_denoise)
    p.set_defaults(func=cmd_denoise)

    from .service import SAVE_FORMATS, ServiceOptions

    d = ServiceOptions()  # serve's defaults are ServiceOptions' (which reads the pipeline's and channel's)
    p = sub.add_parser("serve", help="denoise a ZMQ frame stream until interrupted",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default=d.source)
    p.add_argument("--source-type", default=d.source_type, choices=["pull", "sub"])
    p.add_argument("--publish", default=d.publish, help="PUSH endpoint ('' for none)")
    p.add_argument("--preview", default=d.preview, help="PUB endpoint for the lossy live preview")
    p.add_argument("--save", default=None, help="directory for OME-TIFF files")
    p.add_argument("--save-kind", default=d.save_kind, choices=["denoised", "raw", "both"])
    p.add_argument("--save-format", default=d.save_format, choices=list(SAVE_FORMATS),
                   help="files --save writes (ome-zarr needs the [zarr] extra)")
    p.add_argument("--roll-every", type=int, default=d.roll_every, help="frames per file")
    p.add_argument("--pixel-size", type=float, default=None, help="pixel size in um (OME metadata)")
    p.add_argument("--budget-ms", type=float, default=d.budget_ms, help="latency budget per frame")
    p.add_argument("--max-latency-ms", type=float, default=d.max_latency_ms, metavar="MS",
                   help="on a machine slower than the camera: a frame whose network answer would come out later "
                        "than MS after arrival, while a newer frame of its channel waits, gets the classical "
                        "answer (status bootstrap, reason overload), so latency stays bounded; 0 (default): "
                        "every frame gets the network, however late")
    p.add_argument("--cold-start", default=d.cold_start, choices=["classical", "wait"],
                   help="while a new channel's network trains: answer with a Gaussian pre-denoiser "
                        "(classical) or hold its frames until the network answers (wait)")
    p.add_argument("--no-temporal", action="store_true", help="no Noise2Noise-in-time fine-tuning")
    p.add_argument("--cold-start-steps", "--bootstrap-steps", dest="cold_start_steps", type=int,
                   default=d.cold_start_steps, help="training steps of a channel's cold start")
    p.add_argument("--init", default=d.init, metavar="auto|random|generic|CHANNEL",
                   help="where a new channel's network starts (CHANNEL: that channel's trained network)")
    p.add_argument("--state", default=None, metavar="DIR",
                   help="keep what each channel learnt in DIR: known channels start warm next time")
    p.add_argument("--average", type=int, default=d.average_frames, metavar="N",
                   help="average what did not change over up to N outputs, after registering the stage "
                        "drift (restarts where the sample changes); 1 = off, e.g. for fast calcium transients")
    p.add_argument("--bind", default=None, help="host other than 127.0.0.1 to accept (warned about)")
    p.add_argument("--status-every", type=float, default=1.0, help="seconds between status lines")
    p.add_argument("--curve", default=None, metavar="KEYDIR",
                   help="CurveZMQ: encrypt all sockets, accept only clients in KEYDIR/authorized")
    _add_model_args(p)
    p.set_defaults(func=cmd_serve)

    from .demo import add_demo_parser

    add_demo_parser(sub, _add_model_args)

    p = sub.add_parser("mm-demo", help="Micro-Manager (UniMMCore) synthetic 2-channel MDA, denoised live",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--timepoints", type=int, default=60)
    p.add_argument("--out", default="fm2s-demo-output", help="a new run-NNN folder is made inside")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between time points")
    p.add_argument("--state", default=None, metavar="DIR", help="as for serve: known channels start warm")
    _add_model_args(p)
    p.set_defaults(func=cmd_mm_demo)

    p = sub.add_parser("calibrate", help="estimate the camera noise of one field (files, T axis: one estimate)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="+", help="frames of one field: several files or a stack's planes (per channel)")
    p.add_argument("--base", default="confocal", help="preset whose noise balance the derived parameters keep")
    p.add_argument("--offset", type=float, default=None,
                   help="camera offset (ADU); without it the darkest regions stand in for it")
    p.add_argument("--json", action="store_true", help="print JSON (keys a, b, offset, read_noise_e, rho, fm2s, ...)")
    p.add_argument("--plot", default=None, metavar="PTC.png", help="draw the photon-transfer curve and the fit")
    p.add_argument("--max-frames", type=int, default=64, help="frames per channel used at most")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("send", help="replay an image stack into a stream",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("file")
    p.add_argument("--to", required=True)
    p.add_argument("--socket", default="push", choices=["push", "pub"])
    p.add_argument("--channel", default="default")
    p.add_argument("--fps", type=float, default=0.0, help="pace frames (0 = as fast as possible)")
    p.add_argument("--first-id", type=int, default=0)
    p.add_argument("--wait", type=float, default=30.0, metavar="S",
                   help="push: wait up to S seconds for the receiver to take each frame, then fail")
    p.add_argument("--curve", default=None, metavar="KEYDIR", help="connect as the CurveZMQ client in KEYDIR")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("receive", help="capture a stream into a TIFF",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="from_", required=True)
    p.add_argument("--socket", default="pull", choices=["pull", "sub"])
    p.add_argument("--save", default=None, help="directory for the TIFF")
    p.add_argument("--count", type=int, default=0, help="stop after N frames (0 = until Ctrl-C)")
    p.add_argument("--timeout", type=float, default=0.0, help="stop after S seconds (0 = never)")
    p.add_argument("--curve", default=None, metavar="KEYDIR", help="connect as the CurveZMQ client in KEYDIR")
    p.set_defaults(func=cmd_receive)

    p = sub.add_parser("keys", help="create CurveZMQ key pairs for remote use")
    p.add_argument("directory", help="new (or empty) directory for the keys")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("state", help="list the channel states kept in a --state directory")
    p.add_argument("directory")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.set_defaults(func=cmd_state)

    from .liveview import PREVIEW_ADDRESS

    p = sub.add_parser("view", help="napari: live raw | denoised view of a running serve's --preview",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="source", default=PREVIEW_ADDRESS, metavar="ADDR",
                   help="the --preview (PUB) address of a running serve")
    p.add_argument("--screenshot", type=Path, default=None, metavar="PATH",
                   help="unattended: save the canvas here after --seconds, print a JSON summary, exit")
    p.add_argument("--seconds", type=float, default=None, help="how long the unattended view runs")
    p.add_argument("--window", action="store_true", help="screenshot the whole window (widget and status too)")
    p.set_defaults(func=cmd_view)
    return ap


def cmd_view(args: argparse.Namespace) -> int:
    """napari with the Live widget on a serve's preview; unattended with --screenshot and --seconds."""
    if (args.screenshot is None) != (args.seconds is None):
        print("view: --screenshot and --seconds go together (an unattended run)", file=sys.stderr)
        return 2
    try:
        from .napari_plugin.view import run_view
    except ImportError as exc:
        print(f"view needs napari: pip install 'fm2s-stream[napari]' ({exc})", file=sys.stderr)
        return 2
    try:
        summary = run_view(args.source, args.screenshot, args.seconds, canvas_only=not args.window)
    except RuntimeError as exc:
        print(f"view: {exc}", file=sys.stderr)
        return 1
    if summary is not None:
        print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fm2s-stream` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "publish", None) == "":
        args.publish = None
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
