"""Prometheus text exposition (format 0.0.4) for the service's few metrics, without a
dependency: counters and histograms keyed by label values, rendered on each scrape."""
from __future__ import annotations

import math
import threading
from collections import Counter as _Counts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


def header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def gauge(name: str, help_text: str, value: float) -> list[str]:
    return header(name, "gauge", help_text) + [f"{name} {_number(value)}"]


class Counter:
    """A counter per label-value tuple."""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help_text, labels
        self._values: _Counts = _Counts()
        self._lock = threading.Lock()

    def inc(self, *label_values, amount: float = 1) -> None:
        with self._lock:
            self._values[label_values] += amount

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return header(self.name, "counter", self.help) + [
            f"{self.name}{_labels(self.labels, values)} {_number(n)}" for values, n in items]


class Histogram:
    """Cumulative-bucket histogram per label-value tuple."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help_text, labels
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[tuple, list] = {}  # label values → [bucket counts, sum, count]
        self._lock = threading.Lock()

    def observe(self, value: float, *label_values, times: int = 1) -> None:
        with self._lock:
            counts, _, _ = series = self._series.setdefault(label_values, [[0] * len(self.buckets), 0.0, 0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += times
            series[1] += value * times
            series[2] += times

    def render(self) -> list[str]:
        lines = header(self.name, "histogram", self.help)
        with self._lock:
            items = sorted((k, (list(c), s, n)) for k, (c, s, n) in self._series.items())
        for values, (counts, total, count) in items:
            for bound, n in zip(self.buckets, counts):
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labels, values, le)} {n}")
            lines.append(f"{self.name}_sum{_labels(self.labels, values)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.labels, values)} {count}")
        return lines
