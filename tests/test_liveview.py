"""LatestFrames: newest frame per channel wins, vitals per channel, rate and latency (no GUI, no sockets)."""

from __future__ import annotations

import threading

import numpy as np

from fm2s_stream.liveview import LatestFrames, LiveFrame


def frame(channel: str, i: int, status: str = "denoised", progress: float = 1.0, latency: float = 10.0) -> LiveFrame:
    px = np.full((4, 4), i, np.uint16)
    return LiveFrame(channel, px, px, {"status": status, "degraded": status != "denoised", "steps": i,
                                       "latency_ms": latency, "cold_start_progress": progress}, i, i)


def test_newest_frame_per_channel_wins_and_take_empties_the_board():
    board = LatestFrames()
    for i in range(5):
        board.put(frame("GFP", i))
    board.put(frame("DAPI", 9, "bootstrap", 0.4))
    taken = board.take()
    assert sorted(taken) == ["DAPI", "GFP"] and taken["GFP"].frame_id == 4
    assert board.take() == {}
    assert board.received == 6 and board.vitals["GFP"].frames == 5
    v = board.vitals["DAPI"]
    assert v.degraded == 1 and v.cold_start == 0.4 and "cold start 40%" in v.line()
    assert "GFP: denoised, 4 steps, 0/5 degraded" in board.status_line()


def test_latency_percentiles_and_rate():
    board = LatestFrames()
    assert np.isnan(board.latency_ms()[0]) and board.fps() == 0.0
    for i in range(100):
        board.put(frame("c", i, latency=float(i)))
    p50, p99 = board.latency_ms()
    assert 49 <= p50 <= 50 and p99 >= 98
    assert board.fps() > 100  # 100 frames within a moment


def test_puts_from_many_threads_are_all_counted():
    board = LatestFrames()
    threads = [threading.Thread(target=lambda c=c: [board.put(frame(c, i)) for i in range(200)]) for c in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert board.received == 800 and {k: v.frames for k, v in board.vitals.items()} == dict.fromkeys("abcd", 200)
    assert all(f.frame_id == 199 for f in board.take().values())


def test_odd_header_fields_are_ignored_not_fatal():
    board = LatestFrames()
    px = np.zeros((4, 4), np.uint16)
    board.put(LiveFrame("c", px, px, {"steps": "many", "latency_ms": float("nan"), "degraded": "yes",
                                      "cold_start_progress": None, "status": "x" * 500}))
    v = board.vitals["c"]
    assert v.steps == 0 and v.degraded == 0 and len(v.status) == 32 and np.isnan(board.latency_ms()[0])
