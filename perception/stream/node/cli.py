"""``perception-node``: frames from a source URI -> SegNet -> masks, overlays and stats over ZeroMQ.

    perception-node --source video.mp4
    perception-node --source 0 --config launch/webcam_bayesian.yaml --publish tcp://0.0.0.0:5555

Precedence: built-in defaults < --config YAML < flags. The effective configuration is printed at start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from contextlib import ExitStack, closing
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import yaml

from perception.core.choices import PRECISIONS, TTA_MODES, UNCERTAINTY_MEASURES, DEVICE_HELP, parse_device
from perception.core.config import load_yaml_options
from perception.core.options import add_arguments, at_least, given, in_range, merge, opt, positive, project, validate
from perception.core.sizes import parse_hw
from perception.inference import BACKEND_CHOICES
from perception.core.cli import fail as cli_fail

__all__ = ["NodeConfig", "build_parser", "main", "node_backend", "validate_config"]



@dataclass
class NodeConfig:
    """Every option of perception-node: the flags, the launch-file keys and their checks come from here."""

    source: str | None = opt(None, cli=False)  # --source is added by hand: it repeats (several cameras)
    sources: list[str] | None = opt(None, cli=False)  # several cameras: NAME=URI (or URI)
    model: str | None = opt(None, help="a model by name (perception-models lists them), a model folder, .onnx or "
                                        ".engine (default: the shipped default model)")
    backend: str = opt("auto", choices=BACKEND_CHOICES, help="auto: by the model file (see perception.inference.resolve)")
    device: str = opt("auto", parse=parse_device, help=DEVICE_HELP)
    precision: str = opt("auto", choices=PRECISIONS,
                         help="auto: a model folder's int8 graph on ONNX Runtime where its card shows it within "
                              "0.5 points of fp32's held-out mIoU (and the graph cannot saturate on this CPU: "
                              "7-bit weights, or VNNI), else fp32; fp32 keeps the fp32 graph; bf16 and "
                              "fp16 are the torch backend's")
    tta: str = opt("none", choices=TTA_MODES,
                   help="flip: average each frame's logits with its mirror's (about 2x the compute; see "
                        "docs/benchmarks.md)")
    threads: int | None = opt(None, check=at_least(1), help="inference threads")
    publish: str = opt("tcp://127.0.0.1:5555", help="ZeroMQ endpoint to bind")
    namespace: str = opt("segnet", help="topic prefix")
    frame_id: str = opt("camera", help="frame_id in headers (several cameras: each camera's name)")
    loop: bool = opt(False, help="restart files at the end")
    realtime: bool = opt(False, help="pace files at their native frame rate (default: as fast as possible)")
    resize: str | None = opt(None, help="resize frames to HxW (height x width, e.g. 360x480) before anything else")
    skip: int = opt(0, check=at_least(0), help="drop N frames after each one kept")
    max_frames: int | None = opt(None, check=at_least(1))
    image_encoding: str = opt("bgr8", choices=("bgr8", "jpeg"), help="for color_mask and overlay")
    mask_encoding: str = opt("mono8", choices=("mono8", "png"),
                             help="mask as raw class ids (mono8) or a lossless PNG, 35-98x smaller "
                                  "(for wireless links; docs/benchmarks.md)")
    class_map: str | None = opt(None, metavar="FILE",
                                help="YAML of output classes as groups of the model's (e.g. drivable: [Road]); "
                                     "masks, colours, legend, info and class_pixels follow it (examples in "
                                     "launch/class_maps/)")
    overlay_alpha: float = opt(0.5, check=in_range(0, 1))
    legend: bool = opt(True, help="draw the legend of the classes present on the overlay")
    wait_for_subscribers: int = opt(0, check=at_least(0), help="hold the first frame until N subscribers joined")
    wait_timeout: float | None = opt(None, check=positive, help="seconds to wait for subscribers (default: forever)")
    stats_period: float = opt(1.0, check=positive)
    info_period: float = opt(5.0, check=positive)
    mc_samples: int = opt(8, check=at_least(1), help="MC dropout samples for uncertainty (Bayesian models)")
    uncertainty_measure: str = opt("entropy", choices=UNCERTAINTY_MEASURES,
                                   help="the uncertainty map of Bayesian models: the predictive entropy of the MC "
                                        "samples' mean (nats; ranks errors better, docs/training.md) or the "
                                        "paper's mean class variance")
    sndhwm: int = opt(8, check=at_least(1), help="messages queued per subscriber before the node drops for it")
    checksum: bool = opt(False, help="carry each payload's CRC-32 in its header (crc32); subscribers reject a "
                                     "message whose bytes do not match")
    log_period: float = opt(10.0, check=at_least(0), help="seconds between status lines on stderr (0: none)")
    final_timeout: float = opt(5.0, check=at_least(0), metavar="SECONDS",
                               help="how long the final stats (which tell consumers the node has finished) are "
                                    "repeated for a subscriber that fell behind, while subscribers remain")
    reconnect_attempts: int = opt(5, check=at_least(0),
                                  help="live sources: reconnect attempts (exponential backoff) before giving up, at "
                                       "start too (0: fail at once)")
    stall_timeout: float = opt(5.0, check=positive,
                               help="live sources: seconds without a frame before stats say stalled")
    curve_secret_key: str | None = opt(None, metavar="FILE",
                                       help="CURVE: the node's key pair (server.key_secret from perception-keys); "
                                            "encrypts every stream")
    curve_allow: str | None = opt(None, metavar="FILE_OR_DIR",
                                  help="CURVE: client public keys (.key) admitted; anyone else receives nothing")


def validate_config(cfg: NodeConfig) -> NodeConfig:
    """Every value against its declared type, choices and range; ValueError names the option."""
    validate(cfg)
    parse_hw(cfg.resize, option="--resize")
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append",
                   help="video file, image, folder/glob, camera index or /dev/videoN, rtsp://, http(s)://, "
                        "synthetic://, or demo (a road clip bundled with the package); repeat for several cameras, "
                        "each optionally named NAME=URI "
                        "(topics become <namespace>/<name>/<stream>)")
    p.add_argument("--config", help="YAML file of options (see launch/); flags override it")
    add_arguments(p, NodeConfig)
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    return p


def load_config(args: argparse.Namespace) -> NodeConfig:
    """Defaults < the --config file < flags."""
    file_values: dict[str, Any] = {}
    if args.config:
        file_values = _relative_to(Path(args.config).parent, load_yaml_options(args.config))
    flags = {k: v for k, v in given(args, NodeConfig).items() if k != "source"}  # --source repeats: below
    if args.source:  # flags replace the file's cameras
        file_values.pop("sources", None)
        file_values.pop("source", None)
        flags["source" if len(args.source) == 1 else "sources"] = (
            args.source[0] if len(args.source) == 1 else list(args.source))
    return validate_config(merge(NodeConfig, file_values, flags))


_PATH_OPTIONS = ("model", "source", "curve_secret_key", "curve_allow", "class_map")


def _relative_to(folder: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Relative file paths in a launch file name files next to it (wherever the node is started
    from); URIs, camera indices and /dev paths are left alone. Paths given as flags stay relative to
    the working directory, as on any command line."""
    def resolve(v: str) -> str:
        if v and "://" not in v and not v.isdigit() and not Path(v).is_absolute():
            beside = folder / v
            # A name that is no file beside the launch file is left as it is: a model's name, `demo`.
            if beside.exists() or "/" in v or Path(v).suffix:
                return str(beside)
        return v

    out = dict(values)
    for key in _PATH_OPTIONS:
        if isinstance(out.get(key), str):
            out[key] = resolve(out[key])
    if isinstance(out.get("sources"), list):
        from perception.stream.node.cameras import parse_camera_specs

        try:
            specs = parse_camera_specs([str(v) for v in out["sources"]])
        except ValueError:
            return out  # reported by validation later, naming the option
        out["sources"] = [f"{s.name}={resolve(s.uri)}" for s in specs]
    return out


def _is_local(endpoint: str) -> bool:
    """Whether an endpoint is reachable from this machine only (loopback TCP, ipc, inproc)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def node_backend(cfg: NodeConfig):
    """The backend the node config asks for (see :mod:`perception.inference.resolve`)."""
    from perception.core.cli import print_notes
    from perception.inference.resolve import resolve

    resolution = resolve(cfg.model, backend=cfg.backend, device=cfg.device, precision=cfg.precision,
                         mc_samples=cfg.mc_samples, threads=cfg.threads, tta=cfg.tta,
                         uncertainty_measure=cfg.uncertainty_measure)
    print_notes(resolution.notes)
    return resolution.load()


def _graph_of(backend) -> str:
    """What the startup line says the backend runs: its precision, and the graph file for exported models."""
    path = getattr(backend, "path", None)
    precision = getattr(backend, "precision", "fp32")
    device = getattr(backend, "device", None)
    if device is not None and str(device).startswith("cuda"):  # PyTorch on the GPU: say which, and how
        graphs = "CUDA graphs" if getattr(backend, "graphed", None) is not None else "eager"
        return f"{precision} on {device} ({graphs})"
    return f"{precision} {Path(path).name}" if path is not None and backend.name == "onnxruntime" else precision


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from perception.stream.node.sources import SourceOptions

    def fail(msg: str) -> int:
        return cli_fail("perception-node", msg)

    try:
        cfg = load_config(args)
    except (FileNotFoundError, ValueError, TypeError) as e:
        return fail(str(e))
    if args.print_config:
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
        return 0
    from perception.stream.node.cameras import parse_camera_specs

    try:
        specs = parse_camera_specs(cfg.sources or ([cfg.source] if cfg.source else []))
    except ValueError as e:
        return fail(str(e))
    if not specs:
        return fail("--source is required (a file, folder, camera, stream URL or synthetic://)")
    print("effective config: " + json.dumps(dataclasses.asdict(cfg)), file=sys.stderr, flush=True)
    options = project(SourceOptions, cfg, resize=parse_hw(cfg.resize, option="--resize"))
    with ExitStack() as stack:  # whatever was opened is closed, in reverse order, on every way out
        return _serve(cfg, args, specs, options, stack, fail)


def _serve(cfg: NodeConfig, args: argparse.Namespace, specs, options, stack: ExitStack, fail) -> int:
    """Open the sources, the model and the publisher (each closed by ``stack``), then run the cameras."""
    from perception.core.cli import stop_on_signals
    from perception.stream.node.pipeline import Node, NodeSettings
    from perception.stream.node.sources import SourceError, open_source
    from perception.stream.publisher import Publisher, PublisherError
    from perception.stream.security import CurveError, CurveServer

    multi = len(specs) > 1  # one camera: topics and frame_id exactly as before, a NAME= prefix ignored
    sources = []
    for spec in specs:
        try:
            sources.append((spec, stack.enter_context(closing(open_source(spec.uri, options)))))
        except (SourceError, ValueError) as e:
            return fail(f"camera {spec.name}: {e}" if multi else str(e))
    try:
        backend = stack.enter_context(closing(node_backend(cfg)))
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        return fail(f"model: {e}")
    class_map = None
    if cfg.class_map:
        from perception.core.class_map import load_class_map

        try:
            class_map = load_class_map(cfg.class_map, list(backend.classes), list(backend.palette))
        except (FileNotFoundError, ValueError) as e:
            return fail(str(e))
    if bool(cfg.curve_secret_key) != bool(cfg.curve_allow):
        return fail("--curve-secret-key and --curve-allow go together")
    try:
        curve = CurveServer(cfg.curve_secret_key, cfg.curve_allow) if cfg.curve_secret_key else None
        publisher = stack.enter_context(closing(
            Publisher(cfg.publish, cfg.namespace, sndhwm=cfg.sndhwm, curve=curve, checksum=cfg.checksum)))
    except (PublisherError, CurveError) as e:
        return fail(str(e))
    if not _is_local(publisher.endpoint) and curve is None:
        print(f"perception-node: warning: publishing on {publisher.endpoint}, reachable from other machines "
              "without encryption or authentication: anyone who can connect receives every stream "
              "(see perception-keys: --curve-secret-key/--curve-allow)", file=sys.stderr, flush=True)

    settings = project(NodeSettings, cfg)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    what = f"{backend.name} backend, model {backend.card.id}, {_graph_of(backend)}"
    if multi:
        from perception.stream.node.cameras import run_cameras

        nodes: list = []
        stop_on_signals(lambda: [n.stop() for n in nodes])
        print(f"publishing {cfg.namespace}/<camera>/* on {publisher.endpoint} ({what}, cameras "
              f"{', '.join(f'{s.name}={s.uri}' for s in specs)})", file=sys.stderr, flush=True)
        rc = run_cameras(sources, backend, publisher, settings, namespace=cfg.namespace,
                         frame_id_given=args.frame_id is not None or cfg.frame_id != "camera", log=log,
                         class_map=class_map, on_nodes=nodes.extend)
        stack.close()  # the last messages go (publisher, then model, then sources) before "done"
        for spec, node in zip(specs, nodes):
            c = node.counters
            print(f"done [{spec.name}]: {c.processed} frames processed, {c.skipped} skipped without subscribers, "
                  f"{c.dropped} dropped", file=sys.stderr, flush=True)
        return rc

    node = Node(sources[0][1], backend, publisher, settings, log=log, class_map=class_map)
    stop_on_signals(node.stop)
    print(f"publishing {cfg.namespace}/* on {publisher.endpoint} ({what}, source {specs[0].uri})",
          file=sys.stderr, flush=True)
    rc = node.run()
    stack.close()
    c = node.counters
    print(f"done: {c.processed} frames processed, {c.skipped} skipped without subscribers, {c.dropped} dropped",
          file=sys.stderr, flush=True)
    return rc

if __name__ == "__main__":
    sys.exit(main())
