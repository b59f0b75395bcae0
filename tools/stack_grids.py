"""Stack a demo's per-user grids into one figure for the README.

    python tools/stack_grids.py OUT.png runs/demo_ml/grid_user0.png runs/demo_ml/grid_user1.png ... [--columns 4] [--scale 0.5] [--colors 256]

Each ``grid_user*.png`` (written by ``pgen demo``: rows history, copy_last, retrieve,
generate_nonpersonal, generate_sft, generate_sft_rl, true next item) is cropped to its label
column plus the first ``--columns`` images, scaled by ``--scale`` and stacked top to bottom.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

from pgen_engine.io_utils import atomic_write_bytes

# geometry of pgen_engine.eval.report.image_grid at the demo's settings (64-px images x 3, pad 4)
LABEL_WIDTH, PAD, TILE = 150, 4, 64 * 3


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("grids", nargs="+")
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--colors", type=int, default=256, help="palette size of the PNG (0: full RGB; 256 keeps it small)")
    a = p.parse_args(argv)
    if a.columns < 1 or not 0 < a.scale <= 4:
        p.error("--columns must be >= 1 and --scale in (0, 4]")
    parts = []
    for g in a.grids:
        if not Path(g).is_file():
            p.error(f"{g}: no such grid image")
        im = Image.open(g).convert("RGB")
        width = min(im.width, LABEL_WIDTH + PAD + a.columns * (TILE + PAD))
        im = im.crop((0, 0, width, im.height))
        parts.append(im.resize((round(im.width * a.scale), round(im.height * a.scale)), Image.LANCZOS))
    canvas = Image.new("RGB", (max(x.width for x in parts), sum(x.height for x in parts) + 8 * (len(parts) - 1)),
                       "white")
    y = 0
    for x in parts:
        canvas.paste(x, (0, y))
        y += x.height + 8
    if a.colors:
        canvas = canvas.quantize(colors=min(a.colors, 256), method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(a.out, buf.getvalue())
    print(f"{a.out}: {canvas.width}x{canvas.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
