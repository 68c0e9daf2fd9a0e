"""A bar chart of the benchmark as a PNG, in pure Python (zlib + struct).

Uses matplotlib when it is installed (``pip install -e '.[bench]'``), else
draws the bars and their labels itself with a built-in 5x7 bitmap font, so
``make bench`` needs nothing beyond the standard library.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

Color = tuple[int, int, int]

# 5x7 glyphs, one string of five '#'/'.' per row.
_GLYPHS = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    " ": "..... ..... ..... ..... ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "%": "##..# ##.#. ...#. ..#.. .#... .#.## #..##",
}
_FONT = {ch: [row for row in rows.split()] for ch, rows in _GLYPHS.items() if rows}

WHITE: Color = (255, 255, 255)
BLACK: Color = (30, 30, 30)
GREY: Color = (200, 200, 200)
CGIPOOL: Color = (38, 110, 200)
OTHER: Color = (150, 160, 175)


class Canvas:
    """An RGB raster with rectangles, text and PNG output."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width = width
        self.height = height
        self.rows = [bytearray(bytes(background) * width) for _ in range(height)]

    def rect(self, x: int, y: int, w: int, h: int, color: Color) -> None:
        x0, x1 = max(0, x), min(self.width, x + w)
        if x1 <= x0:
            return
        fill = bytes(color) * (x1 - x0)
        for row in self.rows[max(0, y):min(self.height, y + h)]:
            row[x0 * 3:x1 * 3] = fill

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2) -> int:
        """Draw ``text`` (upper-cased) with its top left at x, y; returns the width."""
        start = x
        for ch in text.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for gy, row in enumerate(glyph):
                for gx, cell in enumerate(row):
                    if cell == "#":
                        self.rect(x + gx * scale, y + gy * scale, scale, scale, color)
            x += 6 * scale
        return x - start

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(row) for row in self.rows)

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def bar_chart(title: str, bars: Sequence[tuple[str, float, str]],
              highlight: str = "cgipool") -> bytes:
    """``bars``: (label, value, value text) -> a horizontal bar chart PNG."""
    try:
        return _matplotlib_chart(title, bars, highlight)
    except ImportError:
        pass
    scale = 2
    label_w = max((len(label) for label, _, _ in bars), default=4) * 6 * scale + 20
    bar_max = 560
    width = label_w + bar_max + 180
    row_h = 34
    top = 50
    height = top + row_h * len(bars) + 20
    canvas = Canvas(width, height)
    canvas.text(10, 14, title, BLACK, scale)
    peak = max((value for _, value, _ in bars), default=1.0) or 1.0
    for i, (label, value, text) in enumerate(bars):
        y = top + i * row_h
        canvas.text(10, y + 6, label, BLACK, scale)
        length = max(1, int(bar_max * value / peak))
        canvas.rect(label_w, y, length, row_h - 8, CGIPOOL if label == highlight else OTHER)
        canvas.text(label_w + length + 8, y + 6, text, BLACK, scale)
    canvas.rect(label_w - 1, top - 4, 1, row_h * len(bars), GREY)
    return canvas.png()


def _matplotlib_chart(title: str, bars: Sequence[tuple[str, float, str]],
                      highlight: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    labels = [label for label, _, _ in bars][::-1]
    values = [value for _, value, _ in bars][::-1]
    colors = ["#266ec8" if label == highlight else "#96a0af" for label in labels]
    fig, ax = pyplot.subplots(figsize=(8, 0.5 * len(bars) + 1))
    ax.barh(labels, values, color=colors)
    for y, (_, _, text) in enumerate(list(bars)[::-1]):
        ax.text(values[y], y, " " + text, va="center")
    ax.set_title(title)
    ax.margins(x=0.25)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    pyplot.close(fig)
    return out.getvalue()
