"""GunicornServer started with tests/faults/gunicorn_faults.conf.py, plus readers of its FAULTS log lines."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..server import GunicornServer

CONFIG = Path(__file__).resolve().parent / "gunicorn_faults.conf.py"
BATCH = re.compile(r"FAULTS batch pid=(\d+) model=(\S+) outcome=(\w+) texts=(\[.*\])$", re.M)


class FaultServer(GunicornServer):
    """The real app and settings; each worker's runners wrapped by the faults config."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, config=CONFIG, **kwargs)

    def start(self, timeout: float = 180) -> "FaultServer":
        super().start(timeout)
        self.wait_armed(timeout)
        return self

    def wait_armed(self, timeout: float = 180) -> None:
        """Until every live worker has logged that its runners are wrapped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            armed = {int(p) for p in re.findall(r"FAULTS armed pid=(\d+)", self.log())}
            if set(self.worker_pids()) <= armed:
                return
            time.sleep(0.1)
        raise TimeoutError(f"fault wrappers not armed in {timeout}s:\n{self.log()}")

    def batches(self) -> list[tuple[int, str, str, list[str]]]:
        """(pid, model, outcome, texts) of every forward pass so far, in order."""
        return [(int(pid), model, outcome, json.loads(texts)) for pid, model, outcome, texts in BATCH.findall(self.log())]
