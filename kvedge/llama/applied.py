"""What llama.cpp says it applied when it made a context, read from its own log.

A requested setting is not an applied one: llama.cpp decides its attention rotation per cache side when
it creates the KV cache (on only for a quantized side whose head size is a multiple of 64, off for every
side when LLAMA_ATTN_ROT_DISABLE is set, and absent from builds before PR #21038), and it states the
decision in one info line per side (`attn_rot_k = 1`, `attn_rot_v = 0`). kvedge listens to llama.cpp's log
while a context is made and keeps those lines, so every report can say what ran, not only what was asked.
A build that says nothing has no rotation at all (it never rotates).
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from dataclasses import dataclass
from typing import Iterator

_LINE = re.compile(r"attn_rot_([kv])\s*=\s*(\d+)")
_lock = threading.Lock()


@dataclass(frozen=True)
class AppliedRotation:
    """The rotation llama.cpp applied to each cache side; None where its log said nothing (a build without
    the rotation). With several caches (sliding-window models) a side counts as rotated only if every cache
    rotates it."""

    k: bool | None
    v: bool | None
    source: str = "llama.cpp log"

    @property
    def reported(self) -> bool:
        return self.k is not None or self.v is not None

    def to_dict(self) -> dict:
        return {"k": self.k, "v": self.v, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict | None) -> "AppliedRotation | None":
        return None if d is None else cls(d.get("k"), d.get("v"), d.get("source", "llama.cpp log"))

    def words(self) -> str:
        if not self.reported:
            return "no rotation in this llama.cpp (its log states none)"
        return ", ".join(f"{side.upper()} {'on' if on else 'off'}" for side, on in (("k", self.k), ("v", self.v))
                         if on is not None)


def parse(text: str) -> AppliedRotation:
    """The rotation a context-creation log states (pure: the unit tests feed it text)."""
    seen: dict[str, list[bool]] = {"k": [], "v": []}
    for side, value in _LINE.findall(text):
        seen[side].append(value != "0")
    return AppliedRotation(*(all(seen[s]) if seen[s] else None for s in ("k", "v")))


def mismatch(applied: AppliedRotation | None, requested: bool, k_quantized: bool, v_quantized: bool) -> str | None:
    """A sentence when llama.cpp applied another rotation than the one a quantized side was run for."""
    if applied is None:
        return None
    problems = []
    for side, quantized, on in (("K", k_quantized, applied.k), ("V", v_quantized, applied.v)):
        if not quantized:
            continue
        if requested and not on:
            problems.append(f"{side} was not rotated" + (" (this llama.cpp has no rotation)" if on is None else ""))
        elif not requested and on:
            problems.append(f"{side} was rotated")
    if not problems:
        return None
    return (f"rotation {'on' if requested else 'off'} was asked, but llama.cpp says {' and '.join(problems)}: "
            "this run measures what llama.cpp applied")


@contextlib.contextmanager
def listening(llama_cpp) -> Iterator[list[str]]:
    """llama.cpp's log text while the block runs (its own logger restored after). The callback is global
    to the library, so one listener at a time."""
    captured: list[str] = []

    @llama_cpp.llama_log_callback
    def _collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        captured.append(text.decode("utf-8", "replace"))

    with _lock:
        llama_cpp.llama_log_set(_collect, ctypes.c_void_p(0))
        try:
            yield captured
        finally:
            from llama_cpp._logger import llama_log_callback

            llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
