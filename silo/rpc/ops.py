"""Operations RPCs (profiles, task dumps, storage admin)."""

from __future__ import annotations


async def serve_local(service, method: str, payload: bytes) -> bytes:
    raise NotImplementedError(method)
