#!/usr/bin/env python3
"""Where a deep shard's RSS goes: one shard in this process, set up like a server worker.

    PYTHONPATH=. .venv/bin/python bench/rss_parts.py [--jobs 200000] [--samples 8]
        [--settle 60] [--set l0_sst_size_bytes=8388608 ...] [--slate KEY=VALUE ...]
        [--show slatedb.db.l0_sst_count ...] [--mmap-threshold N] [--tracemalloc]

The worker's malloc settings (silo.runtime.trim.tune_malloc, unless --mmap-threshold
overrides the threshold), its process-wide block cache and the ShardConfig a worker
derives from Config (`--set` changes Config fields, `--slate` SlateDB settings by
dotted key). Enqueues 1,000 jobs, then up to --jobs in --samples steps, then idles
--settle s (compaction), printing per step: process CPU, peak RSS since the last line
(VmHWM, reset each line), RSS split into anonymous and file-backed, glibc's heap
(malloc_info: system bytes, in use, free, mmapped blocks, arenas), Python's allocated
blocks (tracemalloc's traced bytes with --tracemalloc: slow) and any SlateDB metric
named by --show. Lines marked +trim are after a malloc_trim(0): what is held, not what
glibc kept. bench/README.md "Deep queue" has the figures this found.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import re
import sys
import tempfile
import time
import uuid

from deep_shard import fill  # bench/ is this script's dir: the same filler

from silo.config import Config
from silo.runtime.trim import trim_forever, tune_malloc
from silo.runtime.worker import shard_config
from silo.shard.state import Shard
from silo.storage.database import METRICS_RECORDERS
from silo.storage.slatedb_settings import set_block_cache_bytes

libc = ctypes.CDLL("libc.so.6")
libc.open_memstream.restype = ctypes.c_void_p
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]


def malloc_info() -> dict[str, int]:
    buf = ctypes.c_char_p()
    size = ctypes.c_size_t()
    f = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    libc.malloc_info(0, f)
    libc.fclose(f)
    xml = ctypes.string_at(buf, size.value).decode()
    libc.free(buf)
    # top-level totals are after the last </heap>
    tail = xml[xml.rfind("</heap>"):]
    out = {}
    for kind in ("fast", "rest", "mmap"):
        m = re.search(rf'<total type="{kind}" count="(\d+)" size="(\d+)"', tail)
        out[kind] = int(m.group(2)) if m else 0
    m = re.search(r'<system type="current" size="(\d+)"', tail)
    out["system"] = int(m.group(1)) if m else 0
    out["heaps"] = xml.count("<heap ")
    out["inuse"] = out["system"] - out["fast"] - out["rest"] + out["mmap"]
    return out


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "Threads", "VmHWM"):
                out[k] = int(v.split()[0]) // 1024 if k != "Threads" else int(v.split()[0])
    return out


def metrics(sid: str) -> dict[str, float]:
    rec = METRICS_RECORDERS.get(f"shards/{sid}")
    out = {}
    if rec is None:
        return out
    for m in rec.snapshot():
        if m.value.is_histogram():
            continue
        out[m.name] = out.get(m.name, 0) + m.value[0]
    return out


MB = 1 << 20


def line(tag: str, sid: str, show=()) -> None:
    st = status()
    mi = malloc_info()
    tm = ""
    import tracemalloc
    if tracemalloc.is_tracing():
        tm = f" py_traced={tracemalloc.get_traced_memory()[0] / MB:.0f}"
    ms = metrics(sid)
    extra = " ".join(f"{k.split('/')[-1]}={ms.get(k, 0):.0f}" for k in show)
    t = os.times()
    cpu = t.user + t.system
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    print(f"[{tag}] cpu={cpu:.1f} hwm={st['VmHWM']} rss={st['VmRSS']} anon={st['RssAnon']} file={st['RssFile']} thr={st['Threads']} "
          f"| malloc sys={mi['system'] / MB:.0f} inuse={mi['inuse'] / MB:.0f} free={(mi['fast'] + mi['rest']) / MB:.0f} "
          f"mmap={mi['mmap'] / MB:.0f} heaps={mi['heaps']} | pyblocks={sys.getallocatedblocks()}{tm} {extra}",
          flush=True)


async def main(a) -> None:
    tune_malloc()
    if a.mmap_threshold:
        print("mallopt", libc.mallopt(-3, a.mmap_threshold))
    import msgspec
    cfg = Config()
    ch = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        ch[k] = type(getattr(cfg, k))(v)
    cfg = msgspec.structs.replace(cfg, **ch)
    set_block_cache_bytes(cfg.block_cache_bytes)
    sc = shard_config(cfg)
    for kv in a.slate:
        k, _, v = kv.partition("=")
        sc.slatedb[k] = int(v) if v.isdigit() else v
    url = f"file://{tempfile.mkdtemp(prefix='silo-rss-parts-', dir=a.dir)}"
    sid = str(uuid.uuid4())
    s = await Shard.open(sid, "", "", url, sc)
    trimmer = asyncio.create_task(trim_forever()) if a.trim_task else None
    if a.list_metrics:
        for k in sorted(metrics(sid)):
            print(k)
    show = a.show
    await fill(s, 1000)
    await asyncio.sleep(2)
    libc.malloc_trim(0)
    line("1k", sid, show)
    t0 = time.time()
    step = a.jobs // a.samples
    done = 1000
    while done < a.jobs:
        n = min(step, a.jobs - done)
        await fill(s, n)
        done += n
        line(f"{done // 1000}k t={time.time() - t0:.0f}", sid, show)
    libc.malloc_trim(0)
    line("filled+trim", sid, show)
    for i in range(a.settle // 10):
        await asyncio.sleep(10)
        line(f"settle {10 * (i + 1)}s", sid, show)
    libc.malloc_trim(0)
    line("settled+trim", sid, show)
    if trimmer:
        trimmer.cancel()
    await s.close()
    libc.malloc_trim(0)
    line("closed+trim", sid, show)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200_000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--settle", type=int, default=60)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--set", action="append", default=[], help="Config attr=value")
    ap.add_argument("--slate", action="append", default=[], help="slatedb key=value")
    ap.add_argument("--show", action="append", default=[])
    ap.add_argument("--list-metrics", action="store_true")
    ap.add_argument("--mmap-threshold", type=int, default=0)
    ap.add_argument("--trim-task", action="store_true")
    ap.add_argument("--tracemalloc", action="store_true")
    a = ap.parse_args()
    if a.tracemalloc:
        import tracemalloc
        tracemalloc.start()
    asyncio.run(main(a))
