"""Run logs: ``OUT/metrics.jsonl`` (one JSON object per line) mirrored to TensorBoard (``OUT/tb``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.path = out_dir / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")
        self.history: list[dict[str, Any]] = []
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # TensorBoard is optional at run time; metrics.jsonl has everything
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "time", "event", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record.get('event', 'run')}/{key}", value, record["step"])

    @staticmethod
    def console(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    @staticmethod
    def warn(message: str) -> None:
        tqdm.write(f"pocketlm: warning: {message}", file=sys.stderr)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class SilentLog:
    """The log of a rank other than 0: it writes nothing (rank 0 writes the run's log)."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        pass

    def console(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass
