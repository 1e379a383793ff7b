"""`trainer.profile_steps=N` (the `+debug=profile` preset): a torch.profiler trace of the
first N training steps of the process, written to <run_dir>/profile/ in the format that
TensorBoard's profiler plugin (torch-tb-profiler) reads: `tensorboard --logdir RUN_DIR`.

One step before them is profiled but not recorded (the profiler's warm-up), so the trace
shows steady steps; training itself is unchanged (the profiler only observes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

log = logging.getLogger("vaekit")

WARMUP_STEPS = 1


class StepProfiler:
    """Call `start()` before training, `step()` after every training step and `close()` when
    training ends. With steps=0 they do nothing."""

    def __init__(self, steps: int, out_dir: Path, device: torch.device) -> None:
        self.steps, self.out_dir, self.done, self.started = steps, out_dir, 0, False
        self.profiler: profile | None = None
        if steps <= 0:
            return
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=WARMUP_STEPS, active=steps, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(out_dir)),
            record_shapes=True,
        )

    def start(self) -> None:
        if self.profiler is not None and not self.started:
            self.profiler.start()
            self.started = True

    def step(self) -> None:
        """One training step has finished; after the last profiled one the trace is written."""
        if self.profiler is None or not self.started:
            return
        self.profiler.step()
        self.done += 1
        if self.done >= WARMUP_STEPS + self.steps:
            self.close()

    def close(self) -> None:
        """Stop profiling (writing what was recorded) and say where the trace is."""
        if self.profiler is None or not self.started:
            return
        self.profiler.stop()
        self.profiler = None
        recorded = max(0, self.done - WARMUP_STEPS)
        log.info("profiler trace of %d training step(s) written to %s", recorded, self.out_dir)
