"""A process group made of threads: the collectives the study runner and the workflows use, so that
code written for ``torchrun`` ranks can be tested in one process, with a timeout instead of a hang."""
from __future__ import annotations

import threading

import torch


class ThreadRanks:
    """``world`` ranks; ``ctx(r)`` is rank r's context (``rank``, ``world_size``, ``is_main``, ``barrier``,
    ``all_gather_object``, ``all_reduce_sum``, ``broadcast_object``; ``device`` the CPU)."""

    def __init__(self, world: int, timeout: float = 20):
        self.world, self.slots = world, [None] * world
        self.gate = threading.Barrier(world, timeout=timeout)

    def _gather(self, rank: int, obj) -> list:
        self.slots[rank] = obj
        self.gate.wait()
        out = list(self.slots)
        self.gate.wait()
        return out

    def ctx(self, rank: int):
        group = self

        class Ctx:
            world_size = group.world
            is_main = rank == 0
            device = torch.device("cpu")

            def __init__(self):
                self.rank = rank

            def barrier(self):
                group.gate.wait()

            def all_gather_object(self, obj):
                return group._gather(rank, obj)

            def all_reduce_sum(self, values):
                return [sum(column) for column in zip(*group._gather(rank, list(values)))]

            def broadcast_object(self, obj):
                return group._gather(rank, obj)[0]
        return Ctx()

    def run(self, work) -> tuple[list, list]:
        """``work(ctx)`` on every rank at once: ``(results, errors)`` in rank order."""
        results, errors = [None] * self.world, [None] * self.world

        def one(r):
            try:
                results[r] = work(self.ctx(r))
            except Exception as err:  # noqa: BLE001 - handed back to the test
                errors[r] = err
        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return results, errors
