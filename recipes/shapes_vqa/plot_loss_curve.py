"""Plot a training run's history.jsonl as a PNG with Pillow alone (no matplotlib dependency).

Top panel: training loss per step (log scale, raw in grey, moving average in black). Bottom panel:
validation exact match per question group at each evaluation. Usage:
`python -m recipes.shapes_vqa.plot_loss_curve runs/shapes/history.jsonl docs/loss_curve.png [--mark STEP ...]`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT, MARGIN = 900, 640, 60
SERIES = {"all": (0, 0, 0), "group:colour": (220, 30, 30), "group:shape": (140, 40, 175),
          "group:counting": (30, 70, 225), "group:two-image": (30, 160, 50), "group:position": (250, 135, 10),
          "group:describe": (120, 120, 120), "group:printed text": (200, 170, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("history", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--mark", type=int, nargs="*", default=[], help="steps to mark (e.g. a resume)")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    records = [json.loads(line) for line in args.history.read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    last_step = max(s for s, _ in losses)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    panel_h = (HEIGHT - 3 * MARGIN) // 2
    top, bottom = (MARGIN, MARGIN + panel_h), (2 * MARGIN + panel_h, 2 * MARGIN + 2 * panel_h)

    def x_of(step: float) -> float:
        return MARGIN + (WIDTH - 2 * MARGIN) * step / last_step

    lo, hi = math.log10(min(l for _, l in losses)), math.log10(max(l for _, l in losses))

    def y_loss(loss: float) -> float:
        return top[1] - (top[1] - top[0]) * (math.log10(loss) - lo) / (hi - lo)

    def y_acc(acc: float) -> float:
        return bottom[1] - (bottom[1] - bottom[0]) * acc

    for y0, y1 in (top, bottom):
        draw.rectangle((MARGIN, y0, WIDTH - MARGIN, y1), outline=(0, 0, 0))
    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        for mult in (1, 2, 5):
            value = mult * 10**decade
            if lo <= math.log10(value) <= hi:
                y = y_loss(value)
                draw.line((MARGIN, y, WIDTH - MARGIN, y), fill=(230, 230, 230))
                draw.text((8, y - 7), f"{value:g}", fill=(0, 0, 0), font=font)
    for acc in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line((MARGIN, y_acc(acc), WIDTH - MARGIN, y_acc(acc)), fill=(230, 230, 230))
        draw.text((8, y_acc(acc) - 7), f"{acc:.0%}", fill=(0, 0, 0), font=font)
    for step in range(0, last_step + 1, max(1, last_step // 8 // 500 * 500)):
        for y0, y1 in (top, bottom):
            draw.text((x_of(step) - 12, y1 + 4), str(step), fill=(0, 0, 0), font=font)
    draw.line([(x_of(s), y_loss(l)) for s, l in losses], fill=(200, 200, 200))
    window, smooth = 50, []
    for i in range(len(losses)):
        chunk = losses[max(0, i - window + 1): i + 1]
        smooth.append((losses[i][0], sum(l for _, l in chunk) / len(chunk)))
    draw.line([(x_of(s), y_loss(l)) for s, l in smooth], fill=(0, 0, 0), width=2)
    for key, color in SERIES.items():
        points = [(x_of(s), y_acc(e[key])) for s, e in evals if key in e]
        if len(points) > 1:
            draw.line(points, fill=color, width=3 if key == "all" else 2)
    legend_x = MARGIN + 10
    for key, color in SERIES.items():
        label = key.removeprefix("group:")
        draw.rectangle((legend_x, bottom[1] + 26, legend_x + 12, bottom[1] + 38), fill=color)
        draw.text((legend_x + 16, bottom[1] + 25), label, fill=(0, 0, 0), font=font)
        legend_x += 24 + int(draw.textlength(label, font=font))
    for step in args.mark:
        for y0, y1 in (top, bottom):
            draw.line((x_of(step), y0, x_of(step), y1), fill=(120, 120, 255))
    draw.text((MARGIN, 10), args.title or "training loss (log scale; grey raw, black 50-step mean)",
              fill=(0, 0, 0), font=font)
    draw.text((MARGIN, top[1] + 22), "validation exact match by question group (optimizer step on x)",
              fill=(0, 0, 0), font=font)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.png)


if __name__ == "__main__":
    main()
