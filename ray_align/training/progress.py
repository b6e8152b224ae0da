"""A training progress bar on the driver, fed by rank 0 of the Ray Train workers.

Worker output stays in the Ray logs (engine and DeepSpeed logs would flood the terminal), so
rank 0 sends each step to a tiny actor and a driver thread draws it as a tqdm bar.
"""

from __future__ import annotations

import threading
from typing import Any

from tqdm import tqdm

from ray_align.console import restart_clock


class _Progress:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {"global_step": 0}

    def update(self, state: dict[str, Any]) -> None:
        self.state = state

    def get(self) -> dict[str, Any]:
        return self.state


class TrainProgressBar:
    """``with TrainProgressBar(total_steps) as bar: trainer.fit()``; workers call ``bar.handle``."""

    def __init__(self, total_steps: int, poll_s: float = 2.0) -> None:
        import ray

        self.handle = ray.remote(num_cpus=0)(_Progress).remote()
        self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(poll_s,), daemon=True)

    def _poll(self, poll_s: float) -> None:
        import ray

        while not self._stop.wait(poll_s):
            try:
                state = ray.get(self.handle.get.remote(), timeout=poll_s * 5)
            except Exception:  # noqa: BLE001 - a slow poll must not break training
                continue
            if state["global_step"] and not self._bar.n:
                restart_clock(self._bar)  # the ETA counts from the first step, not the start-up
            self._bar.n = state["global_step"]
            if "loss" in state:
                self._bar.set_postfix(loss=f"{state['loss']:.3f}", tok_s=f"{state['tok_s']:.0f}")
            self._bar.refresh()

    def __enter__(self) -> TrainProgressBar:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._bar.close()
