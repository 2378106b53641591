"""The pre-flight check of image files: header and end of each file, no decode.

`check_files` tells, for every file of an ImageList, its size and content kind, or why no
loader can read it; `require_readable` turns the bad ones into one error naming them. The
loaders, `fastneg convert` and the texture bank all check files here, before any decode.

Refused before any read: anything that is not a regular file (a FIFO would block `open` for
ever, a device such as /dev/zero never ends), symlinks followed. Refused from the header:
images of more than MAX_PIXELS pixels (decompression bombs: a few bytes of PNG can claim
30000 x 30000 pixels, 2.7 GB once decoded). MAX_PIXELS is PIL's MAX_IMAGE_PIXELS (about
89.5 million pixels, e.g. 9459 x 9459) unless the environment variable FASTNEG_MAX_PIXELS sets
it; this module also sets PIL's own limit to it, so that PIL decodes every image the check
accepts and no decode path meets PIL's DecompressionBombError.
"""
from __future__ import annotations

import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastneg.data.imagefolder import ImageList

# Content (not extension) the loaders read, with the colour modes that DALI, torchvision and
# PIL (FFCV conversion) all decode to the same RGB pixels; checked on this machine for each.
# MPO is PIL's name for a JPEG with extra (multi-picture) data after the first image.
SUPPORTED_MODES = {
    "JPEG": ("L", "RGB", "CMYK"),
    "MPO": ("L", "RGB", "CMYK"),
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA"),
}
JPEG_EOI = b"\xff\xd9"
PNG_IEND = b"IEND\xaeB`\x82"
TAIL_BYTES = 1024          # PNG's IEND must end the file; a JPEG's end marker is looked for
                           # from here backwards (see _jpeg_has_end)
JPEG_SOS = b"\xff\xda"


def _max_pixels() -> tuple[int, str | None]:
    """(limit, error): FASTNEG_MAX_PIXELS, or PIL's default with an error for a bad value."""
    text = os.environ.get("FASTNEG_MAX_PIXELS")
    default = int(Image.MAX_IMAGE_PIXELS)
    if text is None:
        return default, None
    if not text.strip().isdigit() or int(text) < 1:
        return default, f"FASTNEG_MAX_PIXELS must be a positive integer, got {text!r}"
    return int(text), None


# The largest width * height an image may have; a bad FASTNEG_MAX_PIXELS is reported by
# check_files (not at import, where it would be a traceback).
MAX_PIXELS, _MAX_PIXELS_ERROR = _max_pixels()
# PIL warns above its limit and refuses above twice it; the check refuses above MAX_PIXELS.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class UnreadableFiles(RuntimeError):
    """Files that passed the pre-flight check but failed to decode at run time.

    `failures` lists (path, reason); str(error) names them and says how to go on.
    """

    def __init__(self, message: str, failures):
        super().__init__(message)
        self.failures = list(failures)


def available_cpus() -> int:
    """Cores this process may run on (respects taskset / container CPU sets, unlike cpu_count)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class FileCheck:
    """Result of check_files: sizes and content of every file, and the ones no loader can read."""
    images: ImageList
    heights: np.ndarray            # int64 [N], 0 for a bad file
    widths: np.ndarray             # int64 [N], 0 for a bad file
    jpeg_rgb: np.ndarray           # bool [N]: JPEG in L or RGB (what nvJPEG decodes on a GPU)
    bad: tuple[tuple[int, str], ...]   # (dataset index, reason), in index order

    @property
    def good(self) -> np.ndarray:
        """Dataset indices of the readable files, ascending."""
        keep = np.ones(len(self.images), bool)
        keep[[i for i, _ in self.bad]] = False
        return np.flatnonzero(keep).astype(np.int64)

    @property
    def bad_files(self) -> tuple[tuple[str, str], ...]:
        """(path, reason) of each file no loader can read."""
        return tuple((str(self.images.path(i)), why) for i, why in self.bad)

    def describe_bad(self, limit: int = 5) -> str:
        lines = [f"  {self.images.path(i)}: {why}" for i, why in self.bad[:limit]]
        if len(self.bad) > limit:
            lines.append(f"  ... and {len(self.bad) - limit} more")
        return "\n".join(lines)


def _jpeg_scan_start(f) -> int | None:
    """Offset of the first start-of-scan marker of the JPEG open in `f`, walking the header's
    marker segments from the start; None when the header ends before one."""
    f.seek(2)                                    # after SOI
    while True:
        marker = f.read(4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return None
        if marker[1] == 0xFF:                    # fill byte before a marker
            f.seek(-3, os.SEEK_CUR)
            continue
        if marker[:2] == JPEG_SOS:
            return f.tell() - 4
        if marker[1] == 0x01 or 0xD0 <= marker[1] <= 0xD7:   # markers without a length
            f.seek(-2, os.SEEK_CUR)
            continue
        length = int.from_bytes(marker[2:], "big")
        if length < 2:
            return None
        f.seek(length - 2, os.SEEK_CUR)


def _jpeg_has_end(f, size: int) -> bool:
    """Whether an end-of-image marker follows the first scan of the JPEG open in `f`.

    Camera files often carry data after the end marker (a second picture, vendor trailers), so
    the marker is searched backwards from the end in growing windows, down to the first scan.
    Inside the compressed scan data 0xFF is always escaped, so a marker found there is real;
    one before the first scan (an EXIF thumbnail's) does not count. A truncated file has none.
    """
    scan = _jpeg_scan_start(f)
    if scan is None:
        return False
    window = TAIL_BYTES
    while True:
        start = max(scan, size - window)
        f.seek(start)
        if JPEG_EOI in f.read():
            return True
        if start == scan:
            return False
        window *= 8


def inspect_file(path) -> tuple[str | None, int, int, str]:
    """(problem or None, height, width, content) of one file, from its header and last bytes.

    Only regular files (after symlinks) are opened; an image over MAX_PIXELS is "too large".
    """
    try:
        kind = os.stat(path).st_mode   # before open: opening a FIFO blocks until a writer comes
    except OSError as e:
        return f"cannot read ({e.strerror or e})", 0, 0, ""
    if not stat.S_ISREG(kind):
        return "not a regular file (a FIFO, device, socket or folder)", 0, 0, ""
    try:
        with open(path, "rb") as f:
            return _inspect_open(f)
    except OSError as e:
        return f"cannot read ({e.strerror or e})", 0, 0, ""


def inspect_bytes(data: bytes) -> tuple[str | None, int, int, str]:
    """inspect_file's verdict on a file held in memory (a sample read from a tar shard)."""
    import io
    return _inspect_open(io.BytesIO(data))


def _inspect_open(f) -> tuple[str | None, int, int, str]:
    """inspect_file's checks on an open binary file (OSError passes through)."""
    try:
        with Image.open(f) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
    except Image.DecompressionBombError as e:     # over twice PIL's limit: PIL refuses
        return _too_large(_claimed_size(f, e)), 0, 0, ""
    except UnidentifiedImageError:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return "empty file", 0, 0, ""
        return "not an image (content not recognised)", 0, 0, ""
    except (OSError, SyntaxError, ValueError) as e:   # PIL's errors for broken headers
        return f"broken image header ({e})", 0, 0, ""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - TAIL_BYTES))
    tail = f.read()
    jpeg_ended = fmt not in ("JPEG", "MPO") or _jpeg_has_end(f, size)
    if fmt not in SUPPORTED_MODES:
        return (f"{fmt} content; the loaders read JPEG and PNG (by content, whatever the "
                "extension): convert this file"), 0, 0, ""
    if mode not in SUPPORTED_MODES[fmt]:
        return f"{fmt} in colour mode {mode}, which the decoders do not agree on", 0, 0, ""
    if fmt == "PNG" and not tail.endswith(PNG_IEND):
        return "truncated PNG (no IEND chunk at the end)", 0, 0, ""
    if not jpeg_ended:
        return "truncated JPEG (no end-of-image marker)", 0, 0, ""
    if h < 1 or w < 1:
        return f"image of size {w}x{h}", 0, 0, ""
    if w * h > MAX_PIXELS:
        return _too_large(f"{w} x {h}"), 0, 0, ""
    return None, h, w, f"{fmt}/{mode}"


def _claimed_size(f, error) -> str:
    """"W x H" from a PNG or JPEG header that PIL refused to open; else PIL's pixel count."""
    from PIL import JpegImagePlugin, PngImagePlugin
    for plugin in (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile):
        f.seek(0)
        try:
            with plugin(f) as im:      # the plugin alone reads the header without PIL's limit
                return f"{im.size[0]} x {im.size[1]}"
        except Exception:   # noqa: BLE001 - not this format
            continue
    pixels = re.search(r"\((\d+) pixels\)", str(error))
    return f"{pixels.group(1)} pixels" if pixels else "its header's size"


def _too_large(claimed: str) -> str:
    return (f"image too large ({claimed} > limit of {MAX_PIXELS} pixels; the environment "
            "variable FASTNEG_MAX_PIXELS sets the limit)")


def check_files(images: ImageList, workers: int) -> FileCheck:
    """Inspect every file (header + last KiB, no decode): cheap enough to run at every start."""
    if _MAX_PIXELS_ERROR:
        raise ValueError(_MAX_PIXELS_ERROR)
    paths = [images.path(i) for i in range(len(images))]
    with ThreadPoolExecutor(max(1, workers)) as pool:   # threads: mostly waiting on file reads
        results = list(pool.map(inspect_file, paths, chunksize=256))
    heights = np.array([r[1] for r in results], np.int64)
    widths = np.array([r[2] for r in results], np.int64)
    jpeg_rgb = np.array([r[3] in ("JPEG/L", "JPEG/RGB") for r in results], bool)
    bad = tuple((i, r[0]) for i, r in enumerate(results) if r[0] is not None)
    return FileCheck(images, heights, widths, jpeg_rgb, bad)


def require_readable(check: FileCheck, skip_bad: bool) -> None:
    """Stop before training with every bad file named, unless the caller asked to skip them."""
    if check.bad and not skip_bad:
        raise ValueError(f"{len(check.bad)} of {len(check.images)} files in {check.images.root} "
                         f"cannot be loaded:\n{check.describe_bad()}\n"
                         "fix or remove them, or leave them out with skip_bad=True "
                         "(`fastneg convert --skip-bad` for FFCV)")
    if len(check.bad) == len(check.images):
        raise ValueError(f"no readable image in {check.images.root}:\n{check.describe_bad()}")
