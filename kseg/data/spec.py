"""What a dataset's labels may contain, and the problem texts: pure Python, no TensorFlow.

Shared by the in-graph validation (kseg.data.decode) and the checker (kseg.data.check), so a
reader and `kseg data check` apply the same rules and say the same thing.
"""

from __future__ import annotations

import dataclasses

from kseg.data.palette import IGNORE_LABEL

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Problem texts.
SHORT = "file is empty or too short to be an image"
NOT_IMAGE = "not a JPEG, PNG, GIF or BMP file"
TRUNCATED_JPEG = "truncated JPEG: no end-of-image marker"
TRUNCATED_PNG = "truncated PNG: no IEND chunk"
CORRUPT = "cannot be decoded: corrupt image data (the decoder failed on this file)"
LABEL_NOT_PNG = "label is not a PNG file; labels must be lossless PNG (JPEG changes the class values)"
COLOUR_MASK = (
    "colour (RGB) mask where a label map of class indices was expected (a palette or "
    "single-channel PNG); convert it with kseg.data.palette.rgb_to_index, or pass palette= "
    "to kseg.data.folder"
)
DEEP_LABEL = "16-bit label PNG; expected 8-bit class indices"
BINARY_MASK = (
    "0/255 binary mask: 255 means ignore in kseg, so every foreground pixel would be "
    "ignored; save it as 0/1 (mask // 255) or pass label_map={255: 1}"
)
UNKNOWN_COLOUR = "colours not in the palette"


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """How a dataset's label files become class indices, and which values are legal.

    kind: "index" (8-bit palette/grayscale PNG whose values are mapped through `lut`),
    "edge" (grayscale edge strength 0..255 -> float 0..1) or "class" (an integer per image).
    lut: 256 entries, raw file value -> class index or 255 (ignore); -1 marks a value that
    must not occur (an error, never a silent default).
    colours: for "index" labels that may also come as RGB colour masks: {0xRRGGBB: index}.
    """

    kind: str
    num_classes: int
    lut: tuple[int, ...] | None = None
    expected: str = ""
    colours: tuple[tuple[int, int], ...] | None = None
    binary_check: bool = True

    @property
    def pad_value(self) -> int:
        # Edge maps have no ignore value: padding holds no edge, so it is labelled 0.
        return 0 if self.kind == "edge" else IGNORE_LABEL


def index_spec(num_classes: int, label_map: dict[int, int] | None = None,
               colours: dict[int, int] | None = None, binary_check: bool = True) -> LabelSpec:
    """Labels 0..num_classes-1 plus 255 (ignore); `label_map` renames raw values first."""
    if not 1 <= num_classes <= 255:
        raise ValueError(f"num_classes must be 1..255 (255 is the ignore label), got {num_classes}")
    lut = [-1] * 256
    for v in range(num_classes):
        lut[v] = v
    lut[IGNORE_LABEL] = IGNORE_LABEL
    for raw, new in (label_map or {}).items():
        if not (0 <= raw <= 255) or not (0 <= new < num_classes or new == IGNORE_LABEL):
            raise ValueError(f"label_map entry {raw} -> {new}: raw values are 0..255 and targets "
                             f"0..{num_classes - 1} or {IGNORE_LABEL}")
        lut[raw] = new
    legal = [v for v in range(256) if lut[v] >= 0]
    return LabelSpec("index", num_classes, tuple(lut), _describe(legal),
                     tuple(sorted(colours.items())) if colours else None,
                     binary_check and lut[IGNORE_LABEL] == IGNORE_LABEL)


def _describe(values: list[int]) -> str:
    runs, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            runs.append(f"{start}" if start == v else f"{start}..{v}")
            start = None
    return ", ".join(runs)
