"""Helpers shared by the training tests (and tests/ddp_worker.py)."""

from __future__ import annotations

from p4bg.training import Trainer


def stop_after(trainer: Trainer, step: int) -> None:
    """Make ``trainer.run()`` stop after ``step`` as a Ctrl-C would: the loop saves and stops
    at a step boundary."""
    original_step = trainer.train_step

    def stopping() -> dict:
        row = original_step()
        if trainer.step >= step:
            trainer.stop_requested = True
        return row

    trainer.train_step = stopping
