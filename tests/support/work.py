"""Work counted, not timed: the lines of kvedge's own Python that a block runs. The same count on every
machine at any load, so a test can bound how much work a hostile input causes without racing a clock;
past its `limit` the block is stopped at once (TooMuchWork), so a runaway input fails the test instead
of spinning. Calls into C (struct, mmap) are not lines: each is bounded by the call that makes it."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import kvedge

KVEDGE = str(Path(kvedge.__file__).resolve().parent)


class TooMuchWork(AssertionError):
    """Not an error of the code under test (pytest.raises(ModelFileError) does not catch it)."""


class Work:
    lines = 0


@contextmanager
def kvedge_lines(limit: int) -> Iterator[Work]:
    work = Work()

    def line(frame, event, arg):
        if event == "line":
            work.lines += 1
            if work.lines > limit:
                raise TooMuchWork(f"more than {limit:,} lines of kvedge ran")
        return line

    def call(frame, event, arg):  # trace only kvedge's frames
        return line if frame.f_code.co_filename.startswith(KVEDGE) else None

    before = sys.gettrace()
    sys.settrace(call)
    try:
        yield work
    finally:
        sys.settrace(before)
