"""Prometheus counters of the HTTP API: requests by model, endpoint and status (an HTTP
status, or `aborted` for a stream whose client went away before its end), tokens (aborted
requests included: they were computed), time to first token and model loads.

A request for a model the store does not hold is counted under model="", so that clients
cannot grow the label set.
"""

from __future__ import annotations

import threading
from typing import Any

ABORTED = "aborted"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.completion_tokens: dict[str, int] = {}
        self.ttft: dict[str, list[float]] = {}

    def request(self, model: str, endpoint: str, status: int | str) -> None:
        with self.lock:
            key = (model, endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def tokens(self, model: str, prompt: int, completion: int, ttft: float | None) -> None:
        with self.lock:
            self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + prompt
            self.completion_tokens[model] = self.completion_tokens.get(model, 0) + completion
            if ttft is not None:
                sums = self.ttft.setdefault(model, [0.0, 0.0])
                sums[0] += ttft
                sums[1] += 1

    def render(self, cold_starts: list[dict[str, Any]]) -> str:
        lines = ["# TYPE sllmctl_requests_total counter"]
        with self.lock:
            for (m, e, s), n in sorted(self.requests.items()):
                lines.append(f'sllmctl_requests_total{{model="{_label(m)}",'
                             f'endpoint="{_label(e)}",status="{s}"}} {n}')
            lines.append("# TYPE sllmctl_prompt_tokens_total counter")
            lines += [f'sllmctl_prompt_tokens_total{{model="{_label(m)}"}} {n}'
                      for m, n in sorted(self.prompt_tokens.items())]
            lines.append("# TYPE sllmctl_generation_tokens_total counter")
            lines += [f'sllmctl_generation_tokens_total{{model="{_label(m)}"}} {n}'
                      for m, n in sorted(self.completion_tokens.items())]
            lines.append("# TYPE sllmctl_time_to_first_token_seconds summary")
            for m, (total, count) in sorted(self.ttft.items()):
                lines.append(f'sllmctl_time_to_first_token_seconds_sum{{model="{_label(m)}"}} '
                             f"{total}")
                lines.append(f'sllmctl_time_to_first_token_seconds_count{{model="{_label(m)}"}} '
                             f"{int(count)}")
        lines.append("# TYPE sllmctl_model_load_seconds gauge")
        for c in cold_starts:
            lines.append(f'sllmctl_model_load_seconds{{model="{_label(c["model"])}",'
                         f'tier="{c["tier"]}"}} {c["seconds"]}')
        return "\n".join(lines) + "\n"
