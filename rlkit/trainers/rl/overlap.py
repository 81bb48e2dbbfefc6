"""Asynchronous rollouts (``rollout.max_staleness: 1``): the engine generates the next batch while the trainer
updates on this one, as verl's one-step-off-policy trainer does.

One background thread runs the collect phase (rollout, reward, dynamic sampling) one batch ahead. The engine
holds one batch of work at a time and cannot change weights mid-generation, so after each update the trainer
waits for the batch in flight, pushes the new weights, and the thread starts the next batch from them: every
sample is exactly one update old (``batch.policy_version``; ``rollout/staleness``), except the first batch and
the first after a resume, which are fresh. The update corrects for it as for any other sampler: old log-probs
recomputed by the trainer, importance weights against the sampler's log-probs (``rl.tis_cap``, ``rl.is_mode``).

Where generation and update both need the same cores (a CPU), overlapping them gains nothing: on 2 cores an
r1_zero step on vLLM took 1.9 s in sequence and 2.1 s overlapped (each thread with the process's 2 torch
threads), 2.8 s with one thread each (benchmarks/RESULTS.md). The gain is where the engine has a device of
its own to itself, or a server on other hardware.

Each batch's sampling seeds come from the run's seed and the batch's index, not from the global RNG (which
the update's thread draws from meanwhile), so a run is reproducible. Resume: the checkpoint stores the prompt
position after the last batch trained on; the batch that was in flight is generated again from the
checkpoint's weights (so it is fresh, where the uninterrupted run's was one update old).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor


class RolloutAhead:
    """``collect(index)`` for batch after batch, one ahead of the trainer, on a background thread."""

    def __init__(self, collect, start_index: int):
        self._collect = collect
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlkit-rollout")
        self._next = start_index
        self._future: Future | None = None
        self.lock = threading.Lock()  # held while the engine generates; the trainer takes it to push weights
        self.waited = 0.0             # seconds the trainer waited for batches (time/rollout_wait)

    def start(self, version: int) -> None:
        """Begin the next batch now, from the weights of ``version`` (the engine's current weights)."""
        index, self._next = self._next, self._next + 1

        def work():
            with self.lock:
                return self._collect(index, version)

        self._future = self._pool.submit(work)

    def take(self):
        """The batch in flight (started if none is), waiting for it."""
        if self._future is None:
            raise RuntimeError("no batch in flight")
        t0 = time.perf_counter()
        batch = self._future.result()
        self.waited += time.perf_counter() - t0
        self._future = None
        return batch

    def pop_waited(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited

    def idle(self):
        """A context in which the engine is not generating (the trainer pushes weights, evaluates)."""
        return self.lock

    def close(self) -> None:
        if self._future is not None:
            self._future.cancel()
            try:
                self._future.result()
            except BaseException:  # the run is ending anyway: its own error is the one reported
                pass
        self._pool.shutdown(wait=True)
