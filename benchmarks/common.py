"""What every benchmark script shares: percentiles, one summary shape, a `--json` option.

`benchmarks/report.py` runs the scripts with `--json PATH` and builds the report from
those files, so each script prints for people and writes numbers for the report.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["LatencySummary", "add_json_option", "percentile", "write_json"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of `values` (any order), q in [0, 1]."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True)
class LatencySummary:
    """Count, rate and latency percentiles of one measured run (milliseconds)."""

    count: int
    seconds: float
    rate_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def of(
        cls, latencies_s: Sequence[float], elapsed_s: float, ok: int | None = None
    ) -> LatencySummary:
        done = len(latencies_s) if ok is None else ok
        return cls(
            count=len(latencies_s),
            seconds=round(elapsed_s, 3),
            rate_per_s=round(done / elapsed_s, 1) if elapsed_s > 0 else 0.0,
            p50_ms=round(percentile(latencies_s, 0.50) * 1000, 3),
            p99_ms=round(percentile(latencies_s, 0.99) * 1000, 3),
            mean_ms=round(statistics.fmean(latencies_s) * 1000, 3),
        )

    def line(self) -> str:
        return (
            f"{self.count} in {self.seconds:.2f}s = {self.rate_per_s:,.0f}/s, "
            f"p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")


def write_json(path: str | None, data: Mapping[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(dict(data), indent=2) + "\n")
