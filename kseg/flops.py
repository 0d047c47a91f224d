"""Multiply-accumulates and FLOPs of a Keras model, per layer and in total, from the layer shapes.

Convention (the one behind the papers' figures): **FLOPs = 2 x MACs** for the layers with
weights -- a multiply-accumulate is a multiply and an add -- plus, for pooling and bilinear
resizing, one FLOP per window element / interpolation operand. Bias adds, BatchNorm,
activations, element-wise adds/scales, padding, cropping, concatenation and unpooling's
scatter are not counted (together well under 1% of these networks, and memory-bound).
Everything is per image (batch 1).

- Conv2D (any stride, dilation or groups): MACs = H_out * W_out * C_out * k_h * k_w * C_in / groups.
  Dilation spreads the taps but does not add any.
- Conv2DTranspose: every input pixel scatters a k_h x k_w x C_out kernel:
  MACs = H_in * W_in * C_in * k_h * k_w * C_out (the cropped borders of "same" padding included).
- DepthwiseConv2D / SeparableConv2D: the depthwise and pointwise parts added up.
- Dense: inputs * units per position (a Dense on a (H, W, C) map runs once per pixel).
- Pooling: k_h * k_w FLOPs per output value; global/adaptive pooling one per input value.
- kseg layers: ConnectionTableConv2D counts only its connected kernels (LeNet-5's C3 table),
  RBFOutput inputs * units MACs, MaxPoolingWithArgmax2D as max pooling, ResizeToReference
  (bilinear) 7 FLOPs per output value (4 multiplies, 3 adds; nearest 0).

So VGG16 at 224x224 is 15.47 GMACs = 30.95 GFLOPs (the "15.5 GFLOPs" often quoted for it are
MACs), and DeepLab-LargeFOV at 321x321 is 50.93 GMACs = 101.9 GFLOPs (101.86 from its
convolutions, 0.05 from its pooling), the figure of the reference measurements.

    >>> import kseg
    >>> report = kseg.flops(kseg.build_model("lenet5"))
    >>> report.total_macs
    416520
    >>> report.total_flops == 2 * report.total_macs + report.rows[1].flops + report.rows[3].flops
    True
    >>> print(report)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import numbers

__all__ = ["FlopsReport", "LayerFlops", "flops"]

_GLOBAL_POOLING = None  # filled on first use: importing keras here would slow `import kseg`


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """One layer's count: `macs` (weight multiply-accumulates) and `flops` (2 * macs + window ops)."""

    name: str
    kind: str
    output_shape: tuple
    params: int
    macs: int
    flops: int


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """Per-layer and total MACs/FLOPs of one model at one input size (per image)."""

    model: str
    input_shape: tuple
    rows: tuple[LayerFlops, ...]

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def gflops(self) -> float:
        return self.total_flops / 1e9

    def by_kind(self) -> dict[str, int]:
        """FLOPs summed per layer class, largest first."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.kind] = out.get(r.kind, 0) + r.flops
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "total_macs": self.total_macs,
            "total_flops": self.total_flops,
            "convention": "FLOPs = 2 x MACs of conv/dense layers + pooling/resize window ops; per image",
            "layers": [dataclasses.asdict(r) | {"output_shape": list(r.output_shape)} for r in self.rows],
        }

    def table(self, all_layers: bool = False) -> str:
        """A plain-text table; layers without any count are left out unless all_layers."""
        rows = [r for r in self.rows if all_layers or r.flops or r.params]
        total = self.total_flops or 1
        scale, unit = next((s, u) for s, u in ((1e9, "G"), (1e6, "M"), (1e3, "K"), (1, "")) if total >= 100 * s)
        header = ("layer", "type", "output", "params", f"{unit}MACs", f"{unit}FLOPs", "%")

        def num(v):
            return f"{v / scale:,.2f}"

        body = [
            (r.name, r.kind, "x".join(map(str, r.output_shape)), f"{r.params:,}", num(r.macs), num(r.flops),
             f"{100 * r.flops / total:.1f}")
            for r in rows
        ]
        footer = ("total", "", "", f"{sum(r.params for r in self.rows):,}", num(self.total_macs),
                  num(self.total_flops), "100.0")
        widths = [max(len(str(line[i])) for line in [header, *body, footer]) for i in range(len(header))]

        def fmt(line):
            return "  ".join(s.ljust(w) if i < 3 else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths)))

        rule = "-" * len(fmt(header))
        title = (f"{self.model} at {'x'.join(map(str, self.input_shape))}: {self.total_macs:,} MACs, "
                 f"{self.total_flops:,} FLOPs per image (FLOPs = 2 x MACs + pooling/resize ops)")
        return "\n".join([title, fmt(header), rule, *map(fmt, body), rule, fmt(footer)])

    def __str__(self) -> str:
        return self.table()


def flops(model, input_shape=None) -> FlopsReport:
    """Count MACs and FLOPs of `model` (a keras.Model or a registry name) for one image.

    input_shape: (height, width, channels); needed when the model accepts any size (None
    dimensions), and must agree with its fixed dimensions otherwise. Shapes are propagated
    symbolically through the model's graph, nothing is run.

        >>> import kseg
        >>> r = kseg.flops("deeplab_largefov", (321, 321, 3))
        >>> round(r.total_flops / 1e9, 1)
        101.9
    """
    import keras

    if isinstance(model, str):
        from kseg.api import build_model

        model = build_model(model, input_shape=input_shape)
    if not isinstance(model, keras.Model):
        raise TypeError(f"kseg.flops counts a keras.Model or a registry name, got {type(model).__name__}")
    shape = _resolve_shape(model, input_shape)
    rows: list[LayerFlops] = []
    _walk(model, shape, rows, prefix="")
    return FlopsReport(model.name, shape, tuple(rows))


def _resolve_shape(model, input_shape):
    inputs = model.inputs
    if not inputs or len(inputs) != 1:
        raise ValueError(f"{model.name}: kseg.flops counts single-input models, this one has {len(inputs or [])}")
    declared = tuple(inputs[0].shape[1:])
    if input_shape is None:
        if any(d is None for d in declared):
            raise ValueError(
                f"{model.name} accepts any input size {_fmt(declared)}; pass input_shape=(height, width, "
                f"channels), e.g. kseg.flops(model, (321, 321, {declared[-1]}))"
            )
        return tuple(int(d) for d in declared)
    shape = tuple(int(d) if isinstance(d, numbers.Integral) else d for d in input_shape)
    if len(shape) != len(declared) or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ValueError(f"{model.name}: input_shape must be {len(declared)} positive ints like {_fmt(declared)}, "
                         f"got {input_shape!r}")
    clash = [(have, want) for have, want in zip(declared, shape) if have is not None and have != want]
    if clash:
        raise ValueError(f"{model.name}: input_shape {shape} does not fit the model's fixed input {_fmt(declared)}")
    return shape


def _fmt(shape):
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _walk(model, shape, rows, prefix):
    """Propagate a concrete batch-1 shape through the graph, recording every layer call."""
    import keras

    def record(op):
        def spec(*args, **kwargs):
            out = op.compute_output_spec(*args, **kwargs)
            if isinstance(op, keras.Model) and hasattr(op, "_run_through_graph"):
                # A nested model: count its own layers, named model/layer.
                inner = [a for a in keras.tree.flatten(args) if isinstance(a, keras.KerasTensor)]
                if len(inner) == 1:
                    _walk(op, tuple(inner[0].shape[1:]), rows, prefix=f"{prefix}{op.name}/")
                    return out
            ins = [a for a in keras.tree.flatten((args, kwargs)) if isinstance(a, keras.KerasTensor)]
            outs = [o for o in keras.tree.flatten(out) if isinstance(o, keras.KerasTensor)]
            rows.append(_count(op, ins, outs, prefix))
            return out

        return spec

    graph = model._functional if isinstance(model, keras.Sequential) else model
    if not hasattr(graph, "_run_through_graph"):
        raise TypeError(f"{model.name}: kseg.flops walks functional and Sequential models; a subclassed model "
                        "has no layer graph to read shapes from")
    x = keras.KerasTensor((1, *shape), dtype=model.inputs[0].dtype)
    graph._run_through_graph([x], operation_fn=record)


def _global_pooling():
    from keras import layers as L

    names = ("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
             "GlobalMaxPooling2D", "GlobalMaxPooling3D", "AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D",
             "AdaptiveAveragePooling3D", "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D")
    # Adaptive pooling layers arrived in Keras 3.1x; count whichever this Keras has.
    return tuple(getattr(L, n) for n in names if hasattr(L, n))


def _count(layer, ins, outs, prefix) -> LayerFlops:
    from keras import layers as L

    from kseg import layers as K

    global _GLOBAL_POOLING
    if _GLOBAL_POOLING is None:
        _GLOBAL_POOLING = _global_pooling()
    out_shape = tuple(outs[0].shape[1:]) if outs else ()
    in_shape = tuple(ins[0].shape[1:]) if ins else ()
    params = int(sum(math.prod(w.shape) for w in layer.weights))
    macs = flops = 0
    out_size = math.prod(out_shape) if out_shape else 0
    if callable(getattr(layer, "count_macs", None)):  # a layer that counts itself (attention's matrix products)
        macs = int(layer.count_macs(in_shape))
    elif isinstance(layer, L.SeparableConv2D):
        kh, kw = layer.kernel_size
        c_in = in_shape[-1]
        spatial = out_size // out_shape[-1]
        macs = spatial * c_in * layer.depth_multiplier * (kh * kw + out_shape[-1])
    elif isinstance(layer, L.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        macs = out_size * kh * kw
    elif isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        # Each input position scatters a whole kernel into the output.
        groups = getattr(layer, "groups", 1) or 1
        macs = math.prod(in_shape) * math.prod(layer.kernel_size) * layer.filters // groups
    elif isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
        macs = out_size * math.prod(layer.kernel_size) * in_shape[-1] // layer.groups
    elif isinstance(layer, L.Dense):
        macs = out_size * in_shape[-1]
    elif isinstance(layer, K.ConnectionTableConv2D):
        # Only the connected kernels are computed in the paper's count.
        connections = sum(len(row) for row in layer.table)
        macs = (out_size // out_shape[-1]) * connections * layer.kernel_size**2
    elif isinstance(layer, K.RBFOutput):
        macs = in_shape[-1] * layer.units
    elif isinstance(layer, K.MaxPoolingWithArgmax2D):
        flops = out_size * math.prod(layer.pool_size)
    elif isinstance(layer, (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
                            L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D)):
        flops = out_size * math.prod(layer.pool_size)
    elif isinstance(layer, _GLOBAL_POOLING):
        flops = math.prod(in_shape)
    elif isinstance(layer, K.ResizeToReference):
        flops = 7 * out_size if layer.interpolation == "bilinear" else 0
    elif isinstance(layer, L.UpSampling2D):
        flops = 7 * out_size if layer.interpolation == "bilinear" else 0
    flops += 2 * macs
    return LayerFlops(prefix + layer.name, type(layer).__name__, out_shape, params, int(macs), int(flops))
