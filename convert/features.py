"""Pictures of what a network sees: feature-map grids of chosen layers, and the architecture drawn.

    from convert.features import feature_maps, plot_architecture
    index = feature_maps("runs/dl/best.keras", "cat.jpg", "maps/", layers=["block*_conv3"])
    plot_architecture("lenet5", "lenet5.png", show_shapes=True)   # needs pydot and Graphviz's dot

`feature_maps` runs one image through the model (read as every kseg command reads images, with
the model's own preprocessing, resized to its input size when that is fixed) and writes, for
each chosen layer, `<layer>.png`: a grid of its first `max_maps` channels, each scaled to 0..255
on its own, and `index.json` describing them. Without `layers` it picks each stage's output: of
every run of consecutive layers (in the model's layer order) whose outputs have one spatial size,
the last that no skip connection passes by, i.e. what each pooling or strided step takes in
(VGG's block*_conv3, ResNet's stage outputs rather than the next block's first 1x1 conv beside its
shortcut, DeepLab's fc8); layers that only pad, crop or drop values are passed over, and outputs
that are not [N, H, W, C] maps of more than one pixel are left out. Every file is written to a
temporary name and renamed into place, so no half-written picture is ever seen.

Nothing here imports TensorFlow or Keras before a function that needs them runs.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil

import numpy as np

from convert.io import atomic_output

# Maps smaller than this on their longer side are enlarged by a whole factor (nearest neighbour, so
# every pixel keeps its value) until they are at least this long: a 5x5 map becomes 30x30.
MIN_TILE = 32
# The 1-px lines between the maps, and the cells of a grid's last row that hold no map: a colour no
# grey map pixel has.
SEPARATOR = (40, 90, 200)
DEFAULT_MAX_MAPS = 64
INDEX = "index.json"
# Layers that only pad, crop or drop values: never a default choice.
PASS_THROUGH = ("InputLayer", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D",
                "Cropping3D", "CropToReference", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
                "SpatialDropout3D", "GaussianDropout", "GaussianNoise", "AlphaDropout", "ActivityRegularization")
# How many layer names an error about an unknown name lists.
LIST_IN_ERRORS = 12


# === choosing layers =====================================================================


def _outputs(layer):
    """A layer's output tensors in the model's graph (its first call's, for a shared layer)."""
    try:
        out = layer.output
    except (AttributeError, ValueError):
        return []
    return list(out) if isinstance(out, (list, tuple)) else [out]


def feature_output(layer):
    """The [N, H, W, C] tensor a layer's picture shows (of a layer with several outputs, such as
    SegNet's argmax pooling, the first), or None when it has none."""
    outputs = _outputs(layer)
    if outputs and len(outputs[0].shape) == 4:
        return outputs[0]
    return None


def default_layers(model, input_size=None) -> list:
    """The layers a feature picture shows by default: each stage's output (see the module's notes).

    input_size=(h, w) gives the spatial sizes of a model that takes any size (else they come
    from the model's static shapes)."""
    candidates = [layer for layer in model.layers
                  if type(layer).__name__ not in PASS_THROUGH and feature_output(layer) is not None]
    sizes = _spatial_sizes(model, candidates, input_size)
    cuts = _cut_layers(model)
    chosen, run = [], []
    for i, (layer, size) in enumerate(zip(candidates, sizes)):
        run.append(layer)
        if i + 1 == len(candidates) or sizes[i + 1] != size:
            if size[0] * size[1] > 1:
                # The run's last layer that no skip connection passes by (ResNet's block output, not the
                # next block's first 1x1 conv beside its shortcut), else its last layer.
                chosen.append(next((x for x in reversed(run) if id(x) in cuts), run[-1]))
            run = []
    return chosen


def _cut_layers(model):
    """ids of the layers no connection passes by: no layer before one (in the model's order) feeds a
    layer after it, so everything downstream sees the input through it. The input itself does not
    count: layers that resize or crop to the input's size take it as their reference."""
    position = {id(layer): i for i, layer in enumerate(model.layers)}
    reach = [i for i in range(len(model.layers))]  # the furthest layer each layer's output feeds
    for i, layer in enumerate(model.layers):
        for node in getattr(layer, "_inbound_nodes", [])[:1]:
            for tensor in getattr(node, "input_tensors", []):
                source = getattr(getattr(tensor, "_keras_history", None), "operation", None)
                j = position.get(id(source))
                if j is not None and j < i and type(source).__name__ != "InputLayer":
                    reach[j] = max(reach[j], i)
    cuts, furthest = set(), -1
    for i, layer in enumerate(model.layers):
        if furthest <= i:  # nothing from before layer i reaches past it
            cuts.add(id(layer))
        furthest = max(furthest, reach[i])
    return cuts


def _spatial_sizes(model, layers, input_size):
    shapes = [tuple(feature_output(layer).shape) for layer in layers]
    if all(s[1] is not None and s[2] is not None for s in shapes) or not layers:
        return [s[1:3] for s in shapes]
    if input_size is None:
        raise ValueError(f"{model.name} takes any input size: give one (input_size=(h, w)) to choose its layers")
    import keras

    probe = keras.Model(model.inputs[0], [feature_output(layer) for layer in layers])
    channels = model.inputs[0].shape[-1]
    specs = probe.compute_output_spec(keras.KerasTensor((1, *input_size, channels)))
    specs = specs if isinstance(specs, (list, tuple)) else [specs]
    return [tuple(s.shape[1:3]) for s in specs]


def feature_names(model) -> list[str]:
    """The names of the layers that have a feature map to show, in the model's order."""
    return [layer.name for layer in model.layers if feature_output(layer) is not None]


def select_layers(model, patterns=None, input_size=None) -> list:
    """The layers `patterns` name (exact names or fnmatch globs such as `block*_conv*`), in the
    model's order; default_layers() when patterns is empty or None.

    A name or pattern that matches no layer, or only layers without a [N, H, W, C] output,
    raises ValueError listing some of the layers that have one."""
    if not patterns:
        return default_layers(model, input_size)
    by_name = {layer.name: layer for layer in model.layers}
    chosen = set()
    for pattern in patterns:
        matched = [by_name[pattern]] if pattern in by_name else \
            [layer for layer in model.layers if fnmatch.fnmatchcase(layer.name, pattern)]
        maps = [layer for layer in matched if feature_output(layer) is not None]
        if not maps:
            raise ValueError(_no_match(model, pattern, matched))
        chosen.update(id(layer) for layer in maps)
    return [layer for layer in model.layers if id(layer) in chosen]


def _no_match(model, pattern, matched):
    names = feature_names(model)
    shown = ", ".join(names[:LIST_IN_ERRORS]) + (f", ... ({len(names)} in all)" if len(names) > LIST_IN_ERRORS else "")
    if matched:
        what = ", ".join(f"{layer.name} {tuple(_outputs(layer)[0].shape) if _outputs(layer) else '()'}"
                         for layer in matched[:3])
        return (f"{model.name}: --layers {pattern!r} matches only layers without a feature map [N, H, W, C] "
                f"({what}); layers with one: {shown}")
    return f"{model.name}: no layer matches --layers {pattern!r}; layers with a feature map: {shown}"


# === pictures ============================================================================


def normalise(channel) -> np.ndarray:
    """One map [H, W] as uint8: its minimum 0, its maximum 255, linear between (a constant map: 0)."""
    x = np.asarray(channel, np.float64)
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.zeros(x.shape, np.uint8)
    return np.round((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def grid_geometry(height, width, channels) -> dict:
    """Where `channels` maps of height x width go: rows, columns, zoom, tile and picture size."""
    cols = max(1, math.ceil(math.sqrt(channels)))
    rows = max(1, math.ceil(channels / cols))
    zoom = max(1, math.ceil(MIN_TILE / max(height, width, 1)))
    tile = (height * zoom, width * zoom)
    size = (rows * tile[0] + rows - 1, cols * tile[1] + cols - 1)
    return {"rows": rows, "cols": cols, "zoom": zoom, "tile": list(tile), "size": list(size)}


def feature_grid(maps, max_maps=DEFAULT_MAX_MAPS):
    """The picture of one image's feature maps [H, W, C]: its first max_maps channels, each
    normalised on its own, as a grid with 1-px separators. Returns (uint8 [h, w, 3], geometry)."""
    maps = np.asarray(maps)
    h, w, c = maps.shape
    shown = min(c, max_maps)
    geo = grid_geometry(h, w, shown)
    zoom, (th, tw) = geo["zoom"], geo["tile"]
    picture = np.empty((*geo["size"], 3), np.uint8)
    picture[:] = SEPARATOR
    for k in range(shown):
        r, q = divmod(k, geo["cols"])
        tile = normalise(maps[..., k])
        if zoom > 1:
            tile = tile.repeat(zoom, 0).repeat(zoom, 1)
        top, left = r * (th + 1), q * (tw + 1)
        picture[top:top + th, left:left + tw] = tile[..., None]
    return picture, {**geo, "channels_shown": shown}


def tile_of(picture, geometry, channel):
    """The grey tile of `channel` cut out of a feature_grid picture (at its zoom)."""
    r, q = divmod(channel, geometry["cols"])
    th, tw = geometry["tile"]
    top, left = r * (th + 1), q * (tw + 1)
    return picture[top:top + th, left:left + tw, 0]


def safe_file_names(names) -> list[str]:
    """File-name stems for layer names: characters other than letters, digits, '.', '_' and '-'
    become '_', no leading dot, and names that would collide (also on a case-insensitive file
    system) get -2, -3, ... appended."""
    out, taken = [], set()
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "layer"
        candidate, n = stem, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate.casefold())
        out.append(candidate)
    return out


def write_png(array, path) -> str:
    """A uint8 [H, W, 3] (or [H, W]) array as a PNG at `path`, atomically."""
    from PIL import Image

    with atomic_output(path, force=True) as tmp:
        Image.fromarray(np.asarray(array, np.uint8)).save(tmp, format="PNG")
    return os.fspath(path)


def _write_json(data, path):
    with atomic_output(path, force=True) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")


# === running a model =====================================================================


def prepare_image(image, model, preprocessing, input_size=None):
    """An RGB (or grey) uint8 image [H, W, C] as the model's input batch [1, h, w, C] (float32):
    resized (bilinear) to input_size, else to the model's input size when that is fixed, then
    preprocessed. Returns (batch, (h, w))."""
    from PIL import Image

    image = np.asarray(image, np.uint8)
    fixed = tuple(model.inputs[0].shape[1:3])
    if input_size is not None and None not in fixed and tuple(input_size) != fixed:
        raise ValueError(f"{model.name} takes {fixed[0]}x{fixed[1]} images only; drop --input-size "
                         f"{input_size[0]}x{input_size[1]}")
    size = tuple(input_size) if input_size is not None else fixed if None not in fixed else image.shape[:2]
    if tuple(image.shape[:2]) != size:
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        image = np.asarray(picture.resize((size[1], size[0]), Image.BILINEAR)).reshape(*size, image.shape[-1])
    batch = image[None].astype(np.float32)
    if preprocessing is not None:
        batch = np.asarray(preprocessing.apply(batch), np.float32)
    return batch, size


def write_feature_maps(model, image, out_dir, *, layers=None, max_maps=DEFAULT_MAX_MAPS, preprocessing=None,
                       input_size=None, info=None) -> dict:
    """Feature-map grids of a Keras model's layers for one uint8 image [H, W, C] (see the module's notes).

    layers: names or fnmatch globs (select_layers); preprocessing: a kseg Preprocessing (None:
    raw 0..255 values); input_size=(h, w): resize to it (default: the model's fixed size, else the
    image's own). Writes out_dir/<layer>.png per layer and out_dir/index.json (written last); returns
    the index: each layer's file, output shape, channels shown, min/max (of the whole output and of
    each channel shown) and grid geometry. `info` adds entries to the index's top level.
    """
    import keras

    if max_maps < 1:
        raise ValueError(f"max_maps must be at least 1, got {max_maps}")
    if len(model.inputs) != 1:
        raise ValueError(f"{model.name} takes {len(model.inputs)} inputs; feature maps need a model whose one "
                         "input is the image")
    channels = model.inputs[0].shape[-1]
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != channels:
        raise ValueError(f"{model.name} takes {channels}-channel images; got an image of shape {image.shape}")
    batch, size = prepare_image(image, model, preprocessing, input_size)
    chosen = select_layers(model, layers, size)
    if not chosen:
        raise ValueError(f"{model.name}: no layer has a feature map larger than 1x1 at {size[0]}x{size[1]}; "
                         f"name some with --layers (layers with a feature map: "
                         f"{', '.join(feature_names(model)[:LIST_IN_ERRORS]) or 'none'})")
    probe = keras.Model(model.inputs[0], [feature_output(layer) for layer in chosen])
    outputs = probe(batch, training=False)
    outputs = [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for layer, stem, value in zip(chosen, safe_file_names(layer.name for layer in chosen), outputs):
        picture, geometry = feature_grid(value[0], max_maps)
        file = f"{stem}.png"
        write_png(picture, os.path.join(out_dir, file))
        shown = value[0][..., :geometry["channels_shown"]].reshape(-1, geometry["channels_shown"])
        entries.append({
            "layer": layer.name, "class": type(layer).__name__, "file": file, "shape": list(value.shape),
            "channels": int(value.shape[-1]), "channels_shown": geometry.pop("channels_shown"),
            "min": float(value.min()), "max": float(value.max()),
            "channel_min": [float(v) for v in shown.min(0)], "channel_max": [float(v) for v in shown.max(0)],
            "grid": {**geometry, "separator_px": 1},
        })
    index = {**(info or {}), "input_size": list(size),
             "preprocessing": preprocessing.kind if preprocessing is not None else None,
             "selection": list(layers) if layers else "default: each stage's output", "layers": entries}
    _write_json(index, os.path.join(out_dir, INDEX))
    return index


def feature_maps(source, image, out_dir, *, layers=None, max_maps=DEFAULT_MAX_MAPS, model=None, weights=None,
                 build_kwargs=None, preprocessing=None, input_size=None, unsafe=False) -> dict:
    """write_feature_maps for a model file (any format that gives a Keras model) or a registry name
    (built with `weights`, random without), and an image file of any format kseg reads.

    The preprocessing is `preprocessing` (a kind or model name) if given, else what the file
    records (a training run's kseg_run.json next to it, its kseg metadata) or the architecture's;
    a plain Keras model with none of these is refused, as kseg predict refuses it."""
    from convert.tf_serving import resolve_model
    from kseg import identity as md
    from kseg.images import read_image

    if not os.path.isfile(image):
        raise FileNotFoundError(f"{image} does not exist")
    is_file = os.path.exists(os.fspath(source)) or os.path.exists(os.fspath(source) + ".index")
    if weights is not None and is_file:
        raise ValueError(f"{source} is a model file: --weights goes with a registry name")
    keras_model = resolve_model(source, model=model, build_kwargs=build_kwargs, weights=weights, unsafe=unsafe)
    if preprocessing is not None:
        prep = md.resolve_preprocessing(preprocessing)
    else:
        ident = md.of_file(source) if is_file else None
        prep = ident.preprocessing if ident is not None and ident.preprocessing is not None else \
            md.of_model(keras_model).preprocessing
        if prep is None:
            raise ValueError(f"{source}: no kseg_run.json next to it and no kseg metadata inside, so the input "
                             "preprocessing is unknown; pass --preprocessing (caffe, torch, unit, batchnorm or "
                             "the architecture's name)")
    channels = keras_model.inputs[0].shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"{keras_model.name} takes {channels}-channel inputs, not images")
    pixels = read_image(image, channels=channels)
    info = {"model": os.fspath(source), "architecture": md.of_model(keras_model).architecture,
            "weights": os.fspath(weights) if weights is not None else None, "image": os.fspath(image)}
    return write_feature_maps(keras_model, pixels, out_dir, layers=layers, max_maps=max_maps, preprocessing=prep,
                              input_size=input_size, info=info)


# === the architecture drawn ==============================================================

# What `keras.utils.plot_model` can write (Graphviz's output formats, chosen by the file's suffix).
PLOT_FORMATS = (".png", ".svg", ".pdf", ".jpg", ".jpeg")
PYDOT_INSTALL = "pip install pydot"
GRAPHVIZ_INSTALL = "apt install graphviz (Debian, Ubuntu), brew install graphviz (macOS) or conda install graphviz"


class PlotUnavailable(ImportError):
    """pydot or Graphviz's `dot` program, which keras.utils.plot_model needs, is missing."""


def check_plot_tools():
    """Raise PlotUnavailable naming what to install when pydot or Graphviz's `dot` is missing."""
    try:
        import pydot  # noqa: F401
    except ImportError:
        raise PlotUnavailable(f"drawing a model needs pydot, which is not installed: {PYDOT_INSTALL} (and "
                              f"Graphviz's dot program: {GRAPHVIZ_INSTALL})", name="pydot") from None
    if shutil.which("dot") is None:
        raise PlotUnavailable(f"drawing a model needs Graphviz's dot program, which is not on PATH: "
                              f"{GRAPHVIZ_INSTALL} (pip install graphviz does not bring it)")


def plot_architecture(name, path, *, show_shapes=False, dpi=96, expand_nested=True, build_kwargs=None) -> str:
    """Draw the registered model `name` (built with its default options, or build_kwargs) with
    keras.utils.plot_model: one box per layer with its name (and, with show_shapes, its input and
    output shapes). The file's suffix picks the format (PLOT_FORMATS). Written atomically; when
    pydot or Graphviz is missing PlotUnavailable is raised before anything is built or written."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in PLOT_FORMATS:
        raise ValueError(f"{path}: name a {', '.join(PLOT_FORMATS)} file to draw the model into")
    if dpi < 1:
        raise ValueError(f"dpi must be positive, got {dpi}")
    check_plot_tools()
    import keras

    from kseg.api import build_model

    net = build_model(name, **(build_kwargs or {}))
    with atomic_output(path, force=True) as tmp:
        try:
            keras.utils.plot_model(net, to_file=tmp, show_shapes=show_shapes, show_layer_names=True,
                                   expand_nested=expand_nested, dpi=dpi)
        except ImportError as e:  # Keras' own check of pydot and Graphviz
            raise PlotUnavailable(f"{e} ({PYDOT_INSTALL}; Graphviz: {GRAPHVIZ_INSTALL})") from None
    return os.fspath(path)
