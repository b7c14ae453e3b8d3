"""A small bar chart as PNG bytes, with zlib and a 3x5 pixel font: no plotting library needed.

Enough for `kembali insights --plot`: bars, a baseline, day labels under the
bars and a red marker at the recommended quiet_days. Pure: returns bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

_FONT = {  # 3x5, rows top to bottom, 3 bits each
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 2, 2),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), "a": (0, 7, 1, 7, 7), "c": (0, 7, 4, 4, 7),
    "d": (1, 7, 5, 5, 7), "e": (0, 7, 7, 4, 7), "i": (2, 0, 2, 2, 2), "n": (0, 6, 5, 5, 5),
    "o": (0, 7, 5, 5, 7), "q": (0, 7, 5, 7, 1), "r": (0, 7, 4, 4, 4), "s": (0, 7, 6, 1, 7),
    "t": (2, 7, 2, 2, 3), "u": (0, 5, 5, 5, 7), "y": (0, 5, 7, 1, 7), "=": (0, 7, 0, 7, 0),
    " ": (0, 0, 0, 0, 0), "-": (0, 0, 7, 0, 0), "+": (0, 2, 7, 2, 0),
}  # fmt: skip

WHITE, BAR, AXIS, MARK, TEXT = (255, 255, 255), (138, 75, 20), (60, 60, 60), (210, 30, 30), (40, 40, 40)


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.rows = [bytearray(WHITE * width) for _ in range(height)]

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int]) -> None:
        for y in range(max(0, y0), min(self.height, y1)):
            row = self.rows[y]
            for x in range(max(0, x0), min(self.width, x1)):
                row[3 * x : 3 * x + 3] = bytes(colour)

    def text(self, x: int, y: int, text: str, colour: tuple[int, int, int] = TEXT, scale: int = 2) -> None:
        for ch in text:
            glyph = _FONT.get(ch, _FONT[" "])
            for r, bits in enumerate(glyph):
                for c in range(3):
                    if bits & (4 >> c):
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale, y + (r + 1) * scale, colour)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(row) for row in self.rows)

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + body


def bar_chart(bins: Sequence[tuple[int, int, int]], marker_day: int | None, *, width: int = 720,
              height: int = 360) -> bytes:  # fmt: skip
    """Bars for (from day, to day, count) bins; a red line at ``marker_day``; labels in days."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 40, 20, 30, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    most = max((n for _, _, n in bins), default=0) or 1
    slot = plot_w / max(1, len(bins))
    canvas.text(left, 8, "days to second order", scale=2)
    canvas.text(4, top, str(most), scale=2)
    canvas.text(4, top + plot_h - 10, "0", scale=2)
    for i, (start, _end, n) in enumerate(bins):
        x0 = int(left + i * slot) + 1
        x1 = int(left + (i + 1) * slot) - 1
        h = round(plot_h * n / most)
        canvas.rect(x0, top + plot_h - h, max(x0 + 1, x1), top + plot_h, BAR)
        if i % max(1, len(bins) // 10) == 0:
            canvas.text(x0, top + plot_h + 6, str(start), scale=2)
    canvas.rect(left, top + plot_h, left + plot_w, top + plot_h + 2, AXIS)
    canvas.rect(left - 2, top, left, top + plot_h + 2, AXIS)
    if marker_day is not None and bins:
        i, (start, end, _n) = next(((i, b) for i, b in enumerate(bins) if b[0] <= marker_day <= b[1]),
                                   (len(bins) - 1, bins[-1]))  # fmt: skip
        x = left + int(slot * (i + (min(marker_day, end) - start + 0.5) / (end - start + 1)))
        canvas.rect(x, top, x + 2, top + plot_h, MARK)
        canvas.text(min(x + 4, width - 120), top + 4, f"quiet days={marker_day}", MARK, scale=2)
    canvas.text(left + plot_w // 2 - 20, height - 18, "days", scale=2)
    return canvas.png()
