"""Repeated measurements: median, spread and ratios, printed the same way by every benchmark."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sample:
    """Repeated measurements of one quantity (seconds unless ``unit`` says otherwise)."""

    name: str
    values: tuple[float, ...]
    unit: str = "s"

    @classmethod
    def of(cls, name: str, values: Sequence[float], unit: str = "s") -> Sample:
        if not values:
            raise ValueError(f"no measurements for {name}")
        return cls(name, tuple(values), unit)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile (p99 of 300 values is the 297th smallest)."""
        ordered = sorted(self.values)
        rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
        return ordered[rank - 1]

    @property
    def p99(self) -> float:
        return self.quantile(0.99)

    @property
    def spread(self) -> tuple[float, float]:
        """Interquartile range: robust against the odd scheduler hiccup on a 2-core box."""
        return self.quantile(0.25), self.quantile(0.75)

    def fmt(self, value: float) -> str:
        return fmt(value, self.unit)

    def describe(self, p99: bool = False) -> str:
        low, high = self.spread
        text = f"median {self.fmt(self.median)} (IQR {self.fmt(low)} to {self.fmt(high)}"
        if p99:
            text += f", p99 {self.fmt(self.p99)}"
        return text + f", n={self.n})"


def fmt(value: float, unit: str = "s") -> str:
    if unit != "s":
        return f"{value:.4g} {unit}".rstrip()
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1.0:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.3f} s"


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline > 0 else float("inf")
