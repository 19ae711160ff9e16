#!/usr/bin/env python3
"""Quick start: enqueue a few jobs and process them with a worker.

    scripts/serve.sh                                         # a server on 127.0.0.1:7450
    .venv/bin/python examples/quickstart.py [127.0.0.1:7450] # in another shell

Against a server started with --tenancy, pass a tenant: ``--tenant acme``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid

from silo.client import Failure, RetryPolicy, SiloClient
from silo.worker import TaskContext, Worker


async def resize_image(ctx: TaskContext):
    """The task handler: return a result, return Failure(...), or raise."""
    job = ctx.payload
    await asyncio.sleep(random.uniform(0.05, 0.3))  # pretend to work
    if ctx.cancelled:  # the job was cancelled while we worked
        return None
    if job["width"] <= 0:
        return Failure("BAD_SIZE", {"width": job["width"]})
    return {"image": job["image"], "thumbnail": f"{job['image']}@{job['width']}px"}


async def main(server: str, tenant: str | None) -> None:
    task_group = f"quickstart-{uuid.uuid4().hex[:6]}"
    async with SiloClient([server]) as client:
        # 1. Enqueue jobs (payloads are any msgpack-able value).
        handles = []
        for i, width in enumerate([128, 256, 512, 0]):
            handles.append(await client.enqueue(
                {"image": f"photo-{i}.jpg", "width": width}, task_group,
                tenant=tenant,
                retry_policy=RetryPolicy(retry_count=2, initial_interval_ms=100,
                                         max_interval_ms=500),
                metadata={"source": "quickstart"}))
        print(f"enqueued {len(handles)} jobs into task group {task_group!r}")

        # 2. Process them with a worker (several at a time), until all are done.
        async with Worker(client, task_group, resize_image, concurrency=4,
                          poll_interval=0.1, heartbeat_interval=2.0):
            results = await asyncio.gather(*(h.await_result(timeout=60, poll_interval=0.1)
                                             for h in handles))

        # 3. Look at the outcomes.
        for h, r in zip(handles, results, strict=True):
            if r.succeeded:
                print(f"{h.id}: {r.status.label}: {r.result}")
            else:
                print(f"{h.id}: {r.status.label}: {r.error_code} {r.error_data}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("server", nargs="?", default="127.0.0.1:7450")
    ap.add_argument("--tenant", default=None)
    args = ap.parse_args()
    asyncio.run(main(args.server, args.tenant))
