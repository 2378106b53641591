"""Progress bars: tqdm when it is installed, else a small stand-in with the part of its
interface fastneg uses (tqdm is optional: a bare GPU machine may not have it).

    from fastneg.progress import tqdm
"""
from __future__ import annotations

import sys

try:
    from tqdm import tqdm
except ImportError:
    class tqdm:  # noqa: N801 (tqdm's own name)
        """Counts like tqdm; prints one line per set_postfix() call (the trainer's log steps)
        and nothing else. Accepts and ignores tqdm's display options."""
        monitor_interval = 0

        def __init__(self, iterable=None, total=None, initial=0, disable=False, desc=None,
                     unit="it", **_display):
            self.iterable, self.total, self.n = iterable, total, initial
            self.disable, self.desc, self.unit = disable, desc, unit
            if total is None and iterable is not None and hasattr(iterable, "__len__"):
                self.total = len(iterable)

        def __iter__(self):
            for item in self.iterable:
                yield item
                self.n += 1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()
            return False

        def update(self, n=1):
            self.n += n

        def set_postfix(self, **values):
            if not self.disable:
                shown = " ".join(f"{k}={v}" for k, v in values.items())
                print(f"{self.desc + ': ' if self.desc else ''}{self.n}/{self.total or '?'} "
                      f"{self.unit} {shown}", file=sys.stderr, flush=True)

        def set_description(self, desc=None, refresh=True):
            self.desc = desc

        def close(self):
            pass

        @staticmethod
        def write(text, file=None, **_):
            print(text, file=file or sys.stderr, flush=True)
