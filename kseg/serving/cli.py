"""`kseg export`, `kseg serve` and `kseg worker`: argument parsing and printing around kseg.serving.

kseg/cli.py wires these in with `add_parser(subparsers)`; each handler returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kseg import cliutil


def _option(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as width=0.25, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a plain string, e.g. fc6=3x3_1024_r12


def add_parser(subparsers):
    """Register `export`, `serve` and `worker` on an argparse sub-parser collection."""
    p = subparsers.add_parser("export", help="export a model for TensorFlow Serving (BASE/NAME/VERSION)")
    p.add_argument("model", help="a model file (any format `kseg convert` reads) or a registered model name")
    p.add_argument("--serving", required=True, metavar="BASE/NAME", help="TF Serving model directory")
    p.add_argument("--version", type=int, help="version directory (default: one more than the highest present)")
    p.add_argument("--image-size", type=cliutil.parse_size, metavar="HxW",
                   help=cliutil.size_help("the size predict_images resizes to (default: the model's input size)"))
    p.add_argument("--min-size", type=int, metavar="N",
                   help="detectors that take any size (Faster R-CNN): serving_default and predict_images resize "
                        "each image keeping its aspect ratio so its shorter side is N (default: the layout's test "
                        "scale, 600 py-faster-rcnn, 800 torchvision); boxes stay normalised to the original image")
    p.add_argument("--max-size", type=int, metavar="N",
                   help="detectors that take any size: but never the longer side beyond N pixels (the scale is "
                        "then N / the longer side; default 1000 py-faster-rcnn, 1333 torchvision)")
    p.add_argument("--arch", dest="arch", help="kseg architecture for weights-only files")
    p.add_argument("--num-classes", type=int, help="build option (registered names and --arch)")
    p.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="another build option, e.g. --option width=0.25 (repeatable; values are JSON)")
    p.add_argument("--weights", help="weights for a registered model name: a file, or registered pretrained "
                                     "weights such as imagenet (`kseg weights list`; their classes and "
                                     "preprocessing come along)")
    p.add_argument("--class-names", help="file with one class name per line (stored in the metadata)")
    p.add_argument("--preprocessing", help="override the registry's preprocessing (caffe|torch|unit|batchnorm)")
    p.add_argument("--force", action="store_true", help="replace an existing version directory")
    p.add_argument("--unsafe", action="store_true", help="allow Lambda layers (runs code stored in the file)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export)

    s = subparsers.add_parser("serve", help="serve BASE/NAME/VERSION models over TF Serving's REST (and gRPC) API")
    s.add_argument("base", nargs="?", help="model base directory: BASE/NAME/VERSION/saved_model.pb (or BASE/VERSION/); "
                                          "not read with --broker (the workers load the models)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--rest-api-port", type=int, default=8501, help="REST port (TF Serving's flag name; 0: any free)")
    s.add_argument("--port", default="auto",
                   help="gRPC port (TF Serving's flag name; default 8500 when tensorflow-serving-api is installed; "
                        "'off' disables)")
    s.add_argument("--max-batch-size", type=int, default=8, help="rows per merged batch (1: no batching)")
    s.add_argument("--batch-timeout-ms", type=float, default=2.0, help="longest wait for a batch to fill")
    s.add_argument("--num-batch-threads", type=int, default=1, help="batches run concurrently per signature")
    s.add_argument("--max-body-bytes", type=int, default=64 << 20, help="largest request body (413 beyond)")
    s.add_argument("--poll-seconds", type=float, default=1.0,
                   help="how often BASE is scanned for new versions (TF Serving: file_system_poll_wait_seconds)")
    s.add_argument("--ready-file", help="write {rest_url, grpc_target} here as JSON once serving")
    s.add_argument("--broker", metavar="redis://HOST:PORT/DB",
                   help="queue requests on this Redis for `kseg worker` processes (any number, any machine) "
                        "instead of running the models here")
    s.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                   help="with --broker: answer 504 when no worker has answered within S seconds")
    s.set_defaults(func=cmd_serve)

    w = subparsers.add_parser("worker", help="run BASE's models for `kseg serve --broker` front ends")
    w.add_argument("base", help="model base directory, as for kseg serve (versions and hot reload alike)")
    w.add_argument("--broker", required=True, metavar="redis://HOST:PORT/DB", help="the front ends' Redis")
    w.add_argument("--max-batch-size", type=int, default=8, help="rows pulled from the queue and run at once")
    w.add_argument("--batch-timeout-ms", type=float, default=2.0,
                   help="after the first request, wait this long for more to fill the batch")
    w.add_argument("--poll-seconds", type=float, default=1.0, help="how often BASE is scanned for new versions")
    w.add_argument("--heartbeat-seconds", type=float, default=1.0,
                   help="heartbeat period; a worker silent for 3 periods is presumed dead and its requests "
                        "are taken over")
    w.add_argument("--max-deliveries", type=int, default=3,
                   help="a request taken by this many workers that died before answering gets an error instead")
    w.add_argument("--name", help="consumer name on the broker (default HOST-PID-RANDOM)")
    w.add_argument("--ready-file", help="write {name, pid} here as JSON once serving")
    w.set_defaults(func=cmd_worker)
    return subparsers


def cmd_export(args):
    from convert.tf_serving import resolve_model
    from kseg.identity import identify
    from kseg.serving.exports import export
    from kseg.serving.signatures import read_signature_defs

    build_kwargs = dict(args.option)
    if args.num_classes is not None:
        build_kwargs["num_classes"] = args.num_classes
    # A training run's kseg_run.json next to the file names the classes and the evaluation transform.
    recorded = identify(args.model) if os.path.isfile(args.model) else None
    class_names = list(recorded.class_names) if recorded is not None and recorded.class_names else None
    if args.class_names:
        with open(args.class_names) as f:
            class_names = [line.strip() for line in f if line.strip()]
    model = resolve_model(args.model, model=args.arch, build_kwargs=build_kwargs or None, weights=args.weights,
                          unsafe=args.unsafe)
    if args.weights is None and not os.path.exists(args.model):
        print(f"kseg export: note: {args.model} has freshly initialised weights (no --weights)", file=sys.stderr)
    if recorded is None:  # a registry name: named pretrained weights record their classes and transform
        recorded = identify(model)
    path = export(model, args.serving, version=args.version, image_size=args.image_size,
                  preprocessing=args.preprocessing, class_names=class_names, force=args.force,
                  progress=sys.stderr.isatty(), eval_transform=recorded.eval_transform, min_size=args.min_size,
                  max_size=args.max_size)
    if args.json:
        print(json.dumps({"path": path, "model": model.name}))
    else:
        signatures = ", ".join(n for n in read_signature_defs(path) if not n.startswith("__"))
        print(f"wrote {path} (signatures {signatures}); "
              f"serve it with: kseg serve {_base_of(args.serving)}")
    return cliutil.OK


def _base_of(path):
    return os.path.dirname(os.path.abspath(path)) or "."


def cmd_serve(args):
    from kseg.serving.server import serve

    port = args.port
    if port == "off":
        grpc_port = None
    elif port == "auto":
        grpc_port = "auto"
    else:
        try:
            grpc_port = int(port)
        except ValueError:
            print(f"kseg serve: error: --port must be a number, 'auto' or 'off', got {port!r}", file=sys.stderr)
            return cliutil.USAGE
    if args.base is None and args.broker is None:
        print("kseg serve: error: give a model base directory BASE, or --broker redis://... for queued serving",
              file=sys.stderr)
        return cliutil.USAGE
    broker = {"broker": args.broker, "request_timeout": args.request_timeout} if args.broker else {}
    return serve(args.base, host=args.host, rest_port=args.rest_api_port, grpc_port=grpc_port,
                 max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms,
                 num_batch_threads=args.num_batch_threads, max_body_bytes=args.max_body_bytes,
                 poll_seconds=args.poll_seconds, ready_file=args.ready_file, **broker)


def cmd_worker(args):
    from kseg.serving.worker import work

    return work(args.base, args.broker, ready_file=args.ready_file, max_batch_size=args.max_batch_size,
                batch_timeout_ms=args.batch_timeout_ms, poll_seconds=args.poll_seconds,
                heartbeat_seconds=args.heartbeat_seconds, max_deliveries=args.max_deliveries, name=args.name)
