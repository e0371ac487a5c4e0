"""Host<->GPU copy bandwidth of this machine, through the CUDA driver API only (no torch, no wheels).

WHY: engine B of the share scenario copies 2.08 GB of stored KV to the GPU at 16K tokens. This says what the
machine's copy engines move at all (pinned and pageable memory, one 33.5 MB LMCache chunk at a time as the
loads do, and in big copies), so a load rate can be read against the hardware's, not against a datasheet. Needs only the NVIDIA driver's libcuda.so.1.

Usage: python scripts/h2d_bandwidth.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 33_554_432  # one 256-token chunk of Mistral-7B KV (bf16, 32 layers, 8 KV heads x 128, K and V)
TOTAL = 2_080_000_000  # a 16K-token load


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed with CUDA error {result}")


class Cuda:
    """The few driver calls needed: a context, pinned and device memory, synchronous and stream copies."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise SystemExit(f"h2d_bandwidth: no NVIDIA driver here ({exc}); run it on the GPU machine.") from exc
        _check(self.lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        _check(self.lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        self.ctx = ctypes.c_void_p()
        _check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev), "cuDevicePrimaryCtxRetain")
        _check(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        self.stream = ctypes.c_void_p()
        _check(self.lib.cuStreamCreate(ctypes.byref(self.stream), 0), "cuStreamCreate")

    def pinned(self, size: int) -> ctypes.c_void_p:
        ptr = ctypes.c_void_p()
        _check(self.lib.cuMemAllocHost_v2(ctypes.byref(ptr), ctypes.c_size_t(size)), "cuMemAllocHost")
        ctypes.memset(ptr, 1, size)
        return ptr

    def device(self, size: int) -> ctypes.c_uint64:
        ptr = ctypes.c_uint64()
        _check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size)), "cuMemAlloc")
        return ptr

    def h2d(self, dst: ctypes.c_uint64, src: int, size: int) -> None:
        _check(self.lib.cuMemcpyHtoDAsync_v2(dst, ctypes.c_void_p(src), ctypes.c_size_t(size), self.stream),
               "cuMemcpyHtoDAsync")

    def d2h(self, dst: int, src: ctypes.c_uint64, size: int) -> None:
        _check(self.lib.cuMemcpyDtoHAsync_v2(ctypes.c_void_p(dst), src, ctypes.c_size_t(size), self.stream),
               "cuMemcpyDtoHAsync")

    def sync(self) -> None:
        _check(self.lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")


def timed_gb_s(copy_one: Callable[[int], None], piece: int, total: int, cuda: Cuda, repeats: int = 3) -> float:
    """Best of ``repeats``: ``total`` bytes moved in ``piece``-byte copies (``copy_one(piece)``) on one stream."""
    best = 0.0
    n = max(1, total // piece)
    for _ in range(repeats):
        cuda.sync()
        started = time.perf_counter()
        for _ in range(n):
            copy_one(piece)
        cuda.sync()
        best = max(best, n * piece / (time.perf_counter() - started) / 1e9)
    return round(best, 2)


def spread_h2d_gb_s(cuda: Cuda, dev: ctypes.c_uint64, pool_bytes: int = 4 * 2**30) -> float:
    """H2D of TOTAL bytes in CHUNK copies, each from the next distinct chunk of a ``pool_bytes`` pinned pool."""
    pool = cuda.pinned(pool_bytes)
    offsets = iter(range(0, pool_bytes - CHUNK + 1, CHUNK))
    return timed_gb_s(lambda n: cuda.h2d(dev, pool.value + next(offsets, 0), n), CHUNK, TOTAL, cuda, repeats=1)


def pcie_link() -> dict:
    query = ("name,driver_version,memory.total,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,"
             "pcie.link.width.max")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], check=False,
                             capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return {}
    return dict(zip(query.split(","), (v.strip() for v in out.split(","))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    cuda = Cuda()
    group = 8 * CHUNK
    pinned, dev = cuda.pinned(group), cuda.device(group)
    pageable = ctypes.create_string_buffer(group)
    link = pcie_link()  # read while idle: the current generation may show a power-saving value
    result = {
        "device": link.get("name"), "driver": link.get("driver_version"), "link": link,
        "command": "python scripts/h2d_bandwidth.py" + (f" --out {a.out}" if a.out else ""),
        "weights": None, "versions": {"torch": None, "vllm": None, "lmcache": None},  # none used: the driver API
        "h2d_pinned_chunk_gb_s": timed_gb_s(lambda n: cuda.h2d(dev, pinned.value, n), CHUNK, TOTAL, cuda),
        "h2d_pinned_group_gb_s": timed_gb_s(lambda n: cuda.h2d(dev, pinned.value, n), group, TOTAL, cuda),
        "h2d_pageable_chunk_gb_s": timed_gb_s(lambda n: cuda.h2d(dev, ctypes.addressof(pageable), n), CHUNK, TOTAL,
                                              cuda),
        "d2h_pinned_chunk_gb_s": timed_gb_s(lambda n: cuda.d2h(pinned.value, dev, n), CHUNK, TOTAL, cuda),
        # as a load reads them: each chunk from a different place of a large pinned pool (LMCache's CPU cache)
        "h2d_pinned_chunk_spread_gb_s": spread_h2d_gb_s(cuda, dev),
        "bytes_per_measurement": TOTAL, "chunk_bytes": CHUNK, "group_bytes": group,
        "method": "CUDA driver API (libcuda.so.1) via ctypes: cuMemcpyHtoDAsync/DtoHAsync on one stream, "
                  "best of 3, host-timed around cuStreamSynchronize",
    }
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
