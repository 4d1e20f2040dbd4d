"""A GPU-gated Asynq worker in a process of its own, for the crash and SIGTERM tests.

Usage: ``python tests/asynq_worker_main.py CONFIG_JSON``. CONFIG_JSON has
``redis_url`` (the pool's Redis), ``asynq_url``, ``pool``, ``queue``,
``cls``, ``type``, ``mode`` ("block": the handler waits until cancelled;
"ok": it returns at once; "count": it holds the task 50 ms and keeps the
peak of tasks held at once, over every process, in ``test:peak``),
optionally ``max_concurrent`` (the class's cap) and ``retry_delay_s``, and
worker keyword arguments in ``worker``. Every
handler call LPUSHes ``<pid>:<task id>`` to the Asynq Redis list
``test:ran`` first, so a test sees which process ran what.
"""

from __future__ import annotations

import json
import os
import sys
import time

import redis
import structlog

from gpugate import Gate, Policy, SimulatedSampler
from gpugate.asynq import AsynqWorker, Task

_MAX = (
    "if tonumber(redis.call('GET', KEYS[1]) or 0) < tonumber(ARGV[1]) "
    "then redis.call('SET', KEYS[1], ARGV[1]) end"
)


def main() -> None:
    config = json.loads(sys.argv[1])
    # stdout says "ready" and nothing else; the logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    cls: dict[str, object] = {"priority": 10, "queues": [config["queue"]]}
    if "max_concurrent" in config:
        cls["max_concurrent"] = config["max_concurrent"]
    policy = Policy.from_dict({"classes": {config["cls"]: cls}})
    gate = Gate(
        config["redis_url"],
        pool=config["pool"],
        policy=policy,
        sampler=SimulatedSampler(["24GiB"], name=config["pool"]),
    )
    log = redis.Redis.from_url(config["asynq_url"])
    kwargs = dict(config.get("worker", {}))
    if "retry_delay_s" in config:
        delay = float(config["retry_delay_s"])
        kwargs["retry_delay"] = lambda retried, exc, task: delay
    worker = AsynqWorker(gate, asynq_redis=config["asynq_url"], **kwargs)

    @worker.handle(config["type"], vram="1GiB")
    def handler(task: Task) -> None:
        log.lpush("test:ran", f"{os.getpid()}:{task.id}")
        if config["mode"] == "block":
            while not task.wait_cancelled(0.05):
                pass
        elif config["mode"] == "count":
            held = log.incr("test:now")
            log.eval(_MAX, 1, "test:peak", held)
            time.sleep(0.05)
            log.decr("test:now")

    print("ready", flush=True)
    worker.run()
    gate.close()


if __name__ == "__main__":
    main()
