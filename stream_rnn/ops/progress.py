"""Training progress for humans: a rich progress bar and one summary line per epoch."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class RichTrainProgress:
    """A :class:`stream_rnn.train.trainer.Callback` that draws progress on a rich console."""

    def __init__(self, console: Console, total_epochs: int, steps_per_epoch: int) -> None:
        self.console = console
        self.total_epochs = total_epochs
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  |g| {task.fields[gnorm]:.3f}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task(
            "train", total=steps_per_epoch, epoch=1, epochs=total_epochs, loss=0.0, gnorm=0.0
        )
        self.progress.start()
        self.epoch = 1

    def on_step(self, step: int, epoch: int, loss: float, info: dict[str, Any]) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            # reset() replaces every custom field, so pass them all again
            self.progress.reset(
                self.task, epoch=epoch, epochs=self.total_epochs, loss=loss, gnorm=0.0
            )
        self.progress.update(
            self.task, advance=1, loss=loss, gnorm=float(info.get("grad_norm", 0.0))
        )

    def on_epoch(self, epoch: int, metrics: dict[str, Any], improved: bool) -> None:
        valid = metrics["valid"]
        parts = [f"{k} {v:.4f}" for k, v in valid.items()]
        mark = "  [green]* best[/green]" if improved else ""
        self.console.print(
            f"epoch {epoch:>3}  train loss {metrics['train_loss']:.4f}  valid "
            + "  ".join(parts)
            + f"  ({metrics['elapsed_s']:.0f}s){mark}"
        )

    def close(self) -> None:
        self.progress.stop()
