"""What the user sees while the steps run.

On a terminal (stderr is a tty) and with `progress` on: a tqdm bar over the
optimizer steps with loss, lr, tokens/s and the expert share (tqdm adds the
ETA). Otherwise (a log file, a pipe, a CI job, or --no-progress): one line
every `print_every` steps, averaged over those steps, so a log stays readable:

    step 40/200  loss 2.3456  lr 2.00e-04  1,234 tok/s  experts 71%  elapsed 1m02s  ETA 4m08s

Messages written during the steps (evals, checkpoints) go above the bar.
"""

from __future__ import annotations

import sys
import time


def interactive(progress: bool) -> bool:
    """Whether bars are drawn: progress on and stderr a terminal."""
    return bool(progress) and sys.stderr.isatty()


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    """The bar (interactive) or the interval lines (through `say`)."""

    def __init__(self, enabled: bool, total: int, initial: int, fallback=print, *, every: int = 10, tty=None):
        self.total, self.step, self.every = total, initial, max(1, every)
        self._say = fallback
        self.bar = None
        self._t0 = time.perf_counter()
        self._done0 = initial
        self._reset()
        if (sys.stderr.isatty() if tty is None else tty) and enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, desc="train"
            )

    def _reset(self) -> None:
        self._n, self._loss, self._tokens, self._seconds, self._share_s = 0, 0.0, 0, 0.0, 0.0

    def update(
        self,
        *,
        loss: float,
        lr: float,
        tokens_per_s: float,
        expert_share: float,
        placement: str = "",
        step_tokens: int | None = None,
        step_seconds: float | None = None,
    ) -> None:
        """One optimizer step. placement: the expert placement's short step text, if any;
        step_tokens / step_seconds: this step's, for the interval averages."""
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
                f"experts {100 * expert_share:.0f}%" + (f"  {placement}" if placement else ""),
                refresh=False,
            )
            self.bar.update(1)
            return
        self._n += 1
        self._loss += loss
        if step_tokens is not None and step_seconds is not None:
            self._tokens += step_tokens
            self._seconds += step_seconds
            self._share_s += expert_share * step_seconds
        if self._n >= self.every or self.step >= self.total:
            self._say(self.line(lr, placement))
            self._reset()

    def line(self, lr: float, placement: str = "") -> str:
        elapsed = time.perf_counter() - self._t0
        done = self.step - self._done0
        eta = elapsed / done * (self.total - self.step) if done else 0.0
        parts = [f"step {self.step}/{self.total}", f"loss {self._loss / max(self._n, 1):.4f}", f"lr {lr:.2e}"]
        if self._seconds > 0:
            parts += [
                f"{self._tokens / self._seconds:,.0f} tok/s",
                f"experts {100 * self._share_s / self._seconds:.0f}%",
            ]
        parts += [f"elapsed {fmt_seconds(elapsed)}", f"ETA {fmt_seconds(eta)}"]
        if placement:
            parts.append(placement)
        return "  ".join(parts)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self._say(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
