"""LatencyPolicy: how much the worker may learn after answering a frame. Pure (times come in as arguments).

Publish first, learn after. After each answer the pipeline asks `plan` and trains by the plan:
- a channel in its cold start always gets a guaranteed share of the worker's time (COLD_SHARE of it,
  counting the answer's own time), so the cold start finishes even when frames never stop; beyond
  that it learns until the frame's latency budget is spent or another frame waits. Under a backlog of
  COLD_BACKLOG frames or more the share is taken on every COLD_BACKLOG-th frame only (the same share,
  in fewer pieces), so the answers in between drain the queue;
- a channel whose network already answers while its cold start goes on (the generic start) keeps
  that share only while no frame waits: its answers are already the network's, so a queue is
  drained first;
- a ready channel fine-tunes while no frame waits, at most `max_finetune_steps`, if the wait a step
  can cause the next frame plus one answer fits the budget: a whole step where frames may come at
  any moment; where they come at a steady rate (a camera), a step starts only if it should end
  before the next frame is due, give or take NEXT_FRAME_SLACK of a step, so that share of a step (a
  frame arriving mid-step waits for it, most of the latency beyond the answer itself). An estimate
  found over budget, or too long to fit before the next frame, decays so that a one-off slow step
  (kernel set-up, a busy moment) does not switch fine-tuning off for good. The next frame is due one
  median interval (over the last PERIOD_FRAMES) after its channel's last one; channels that went
  quiet do not count;
- under backlog a ready channel does not learn at all (counted as `finetune_skipped`);
- with a latency bound (`max_latency_ms`, off by default), a frame whose network answer would come out
  later than the bound after its arrival, while a newer frame of its channel waits, is answered by the
  classical pre-denoiser instead (`shed`): on a machine slower than the camera the latency stays
  bounded and every frame still comes out, the newest ones network-denoised.
Costs are smoothed with exponential moving averages (COST_MEMORY of the old value kept).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

__all__ = ["COLD_SHARE", "LatencyPolicy", "Plan"]

COLD_SHARE = 0.25  # a cold start gets at least this share of the worker's time while frames keep coming
COLD_BACKLOG = 4  # with this many frames waiting, a cold start learns on every COLD_BACKLOG-th frame only
COST_MEMORY = 0.9  # EMA weight of the old estimate of a cost
OVER_BUDGET_DECAY = 0.9  # an over-budget step estimate shrinks by this per skipped frame, then is re-measured
PERIOD_FRAMES = 16  # a channel's frame interval: the median of its last this many
NEXT_FRAME_SLACK = 0.5  # a step may end this share of a step after the next frame is due (it waits that long)


@dataclass(frozen=True)
class Plan:
    """What to do after an answer: up to `max_steps` steps, until `deadline` (None: no deadline) or a
    frame waits, but `at_least_s` seconds of training whatever the queue; `skipped` names why not."""

    max_steps: int
    deadline: float | None = None
    at_least_s: float = 0.0
    skipped: bool = False


class LatencyPolicy:
    """Decides, from the queue depth, measured costs and the frame's arrival time, how long the worker learns."""

    def __init__(self, budget_ms: float, max_finetune_steps: int, max_latency_ms: float = 0.0) -> None:
        self.budget_s = budget_ms / 1000.0
        self.max_latency_s = max_latency_ms / 1000.0  # 0: every frame gets the network, however late
        self.max_finetune_steps = max_finetune_steps
        self.answer_s = 0.0  # smoothed cost of answering a frame with the network (0: not measured yet)
        self.step_s = 0.0  # smoothed cost of one fine-tune step (0: not measured yet)
        self._last: dict[str, float] = {}  # per channel: when its latest frame arrived
        self._gaps: dict[str, deque[float]] = {}  # per channel: its latest intervals between frames

    def arrived(self, channel: str, received: float) -> None:
        """Record a frame's arrival (clock time), in the order frames are taken from the queue."""
        last = self._last.get(channel)
        if last is not None and received > last:
            self._gaps.setdefault(channel, deque(maxlen=PERIOD_FRAMES)).append(received - last)
        self._last[channel] = received

    def next_arrival(self, now: float) -> float | None:
        """When the next frame is due (clock time), from each channel's median interval; None if unknown.

        A channel whose frame is more than one interval overdue has gone quiet and is left out."""
        due = []
        for channel, last in self._last.items():
            gaps = self._gaps.get(channel)
            if gaps is None or len(gaps) < 3:
                continue
            period = statistics.median(gaps)
            if last + 2 * period >= now:
                due.append(last + period)
        return min(due) if due else None

    @staticmethod
    def _smooth(old: float, new: float) -> float:
        return new if old == 0 else COST_MEMORY * old + (1 - COST_MEMORY) * new

    def answered(self, seconds: float) -> None:
        """Record what a network answer cost (scaling to quantisation)."""
        self.answer_s = self._smooth(self.answer_s, seconds)

    def stepped(self, seconds: float) -> None:
        """Record what one fine-tune step cost."""
        self.step_s = self._smooth(self.step_s, seconds)

    def shed(self, waited_s: float, newer_waiting: bool) -> bool:
        """True if a frame that has waited `waited_s` should get the classical answer: a newer frame of
        its channel waits (that one, or the newest, gets the network) and the network's answer would
        end beyond the latency bound."""
        return self.max_latency_s > 0 and newer_waiting and waited_s + self.answer_s > self.max_latency_s

    def plan(self, received: float, backlog: int, ready: bool, answer_seconds: float, frame_index: int = 0,
             answers: bool = False) -> Plan:
        """The learning plan after answering a frame received at `received` (clock time) that took
        `answer_seconds`, with `backlog` frames waiting, for a channel that is `ready` or cold
        (`frame_index`: the channel's frame count, for the backlog rule; `answers`: a cold channel's
        network answers already)."""
        if not ready and answers and backlog > 0:
            return Plan(0, skipped=True)
        if not ready:
            share = answer_seconds * COLD_SHARE / (1 - COLD_SHARE)
            if backlog >= COLD_BACKLOG:
                if frame_index % COLD_BACKLOG:
                    return Plan(0)
                share *= COLD_BACKLOG
            return Plan(max_steps=10**9, deadline=received + self.budget_s, at_least_s=share)
        if backlog > 0 or self.max_finetune_steps <= 0:
            return Plan(0, skipped=self.max_finetune_steps > 0)
        # the most a step adds to the next frame's latency: all of it when that frame may come at any
        # moment (steps then stop as soon as it waits); where its arrival is known, steps start only if
        # they should end by then, give or take NEXT_FRAME_SLACK of a step
        due = self.next_arrival(received + answer_seconds) if self.step_s else None
        wait = self.step_s if due is None else NEXT_FRAME_SLACK * self.step_s
        if wait + self.answer_s <= self.budget_s:
            if due is None:
                return Plan(self.max_finetune_steps)
            deadline = due + (NEXT_FRAME_SLACK - 1) * self.step_s
            if deadline >= received + answer_seconds:
                return Plan(self.max_finetune_steps, deadline=deadline)
        # over budget, or no step fits before the next frame: the estimate decays (a one-off slow step,
        # such as the first after the cold start, would otherwise never be re-measured) and is tried again
        self.step_s *= OVER_BUDGET_DECAY
        return Plan(0, skipped=True)

    def sustainable_fps(self) -> float | None:
        """Frames per second at which every frame still gets its full fine-tune (None until measured)."""
        if not self.answer_s or not self.step_s:
            return None
        return 1.0 / (self.answer_s + self.max_finetune_steps * self.step_s)
