"""Locust users for ``make load``: classification requests at a fixed pace, every answer recorded.

Run by bench/load.py (headless, bounded in users, time and count, loopback only). Each
user sends at most ZS_USER_RATE requests per second (locust's constant_throughput);
every request's status and latency go to ZS_RECORD as one JSON line, so goodput (answers
within the latency target) is computed from what the clients saw.
"""

from __future__ import annotations

import json
import os

import gevent
from locust import FastHttpUser, constant_throughput, events, task

RECORD = open(os.environ["ZS_RECORD"], "a", buffering=1)  # noqa: SIM115 - one file for the whole run
MODEL = os.environ.get("ZS_MODEL", "tiny-sentiment")
BODY = {"model": MODEL, "input": ["what a wonderful day", "this is terrible"]}


@events.request.add_listener
def _record(
    request_type: str, name: str, response_time: float, response: object, exception: object, **_: object
) -> None:
    status = getattr(response, "status_code", 0) or 0
    retry_after = (getattr(response, "headers", None) or {}).get("retry-after")
    RECORD.write(json.dumps({"status": status, "ms": response_time, "retry_after": retry_after}) + "\n")


HONOUR_RETRY_AFTER = os.environ.get("ZS_HONOUR_RETRY_AFTER") == "1"


class Classifier(FastHttpUser):
    wait_time = constant_throughput(float(os.environ.get("ZS_USER_RATE", "1")))

    @task
    def classify(self) -> None:
        retry_after = 0.0
        with self.client.post("/v1/classify", json=BODY, catch_response=True) as resp:
            # A refusal with Retry-After is the gateway working as designed, not a client failure.
            if resp.status_code in (429, 503) and resp.headers.get("retry-after"):
                resp.success()
                retry_after = float(resp.headers["retry-after"])
        if HONOUR_RETRY_AFTER and retry_after:
            # What the openai client does with a 429/503: wait as told before the next request.
            gevent.sleep(retry_after)
