"""Draw the example images of the README with the training data's own renderer.

Each scene is written out by hand so the right answers are known: `shapes.png` has one circle
(red), so "What color is the circle?" -> "Red."; `count.png` has four shapes (two circles);
`pair_1.png` / `pair_2.png` differ by one added shape. Run from the repository root: `python -m examples.make_examples`.
"""

from __future__ import annotations

from pathlib import Path

from recipes.shapes_vqa.synthetic import Scene, Shape, render

WHITE = (255, 255, 255)
SCENES = {
    "shapes.png": Scene(224, 224, WHITE, 0.0, 0, (Shape("circle", "red", 60, 70, 30),
                                                  Shape("square", "blue", 160, 90, 28),
                                                  Shape("triangle", "green", 110, 170, 32))),
    "count.png": Scene(224, 224, (235, 240, 250), 0.0, 0, (Shape("circle", "yellow", 45, 50, 22),
                                                          Shape("circle", "purple", 170, 60, 26),
                                                          Shape("triangle", "orange", 70, 160, 30),
                                                          Shape("square", "green", 165, 165, 25))),
    "pair_1.png": Scene(224, 224, WHITE, 0.0, 0, (Shape("square", "orange", 70, 80, 30),
                                                 Shape("circle", "blue", 150, 150, 28))),
    "pair_2.png": Scene(224, 224, WHITE, 0.0, 0, (Shape("square", "orange", 70, 80, 30),
                                                 Shape("circle", "blue", 150, 150, 28),
                                                 Shape("triangle", "red", 165, 55, 26))),
}

if __name__ == "__main__":
    folder = Path(__file__).resolve().parent
    for name, scene in SCENES.items():
        render(scene).save(folder / name)
