"""What a person watching a run sees: a tqdm bar on a terminal, else one line per finished case."""

from __future__ import annotations

from typing import Any, Mapping

from moe_validate.results import Outcome

__all__ = ["Progress"]


class Progress:
    """A tqdm bar on a terminal for long runs; otherwise one plain line per finished case."""

    BAR_MIN_CASES = 20

    def __init__(self, total: int, stream):
        self.total, self.done, self.stream = total, 0, stream
        self.bar = None
        if stream is not None and total >= self.BAR_MIN_CASES and getattr(stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=stream, unit="case", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, record: Mapping[str, Any]) -> None:
        """``record``: a CaseRecord (or its JSON mapping)."""
        self.done += 1
        if self.stream is None:
            return
        outcome = record["outcome"]
        line = f"[{self.done}/{self.total}] {outcome:<13} {record['case_id']}  {record['duration_s']:.2f}s"
        if outcome != Outcome.PASS.value:
            # A FAIL's diagnosis leads (what broke and where); other outcomes say their reason.
            diagnosis = record.get("diagnosis") or {}
            text = (diagnosis.get("summary") if outcome == Outcome.FAIL.value else None) or record.get("reason")
            if text:
                line += f"  {text}"
        if self.bar is not None:
            if outcome != Outcome.PASS.value:
                self.bar.write(line, file=self.stream)
            self.bar.update(1)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
