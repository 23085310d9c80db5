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
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import yaml

from perception.core.config import load_yaml_options
from perception.core.sizes import parse_hw

__all__ = ["NodeConfig", "build_parser", "main", "resolve_backend", "validate_config"]



@dataclass
class NodeConfig:
    source: str | None = None
    sources: list[str] | None = None  # several cameras: NAME=URI (or URI); topics <namespace>/<name>/<stream>
    model: str | None = None  # model folder, .onnx or .engine; default: the shipped CamVid model
    backend: str = "auto"  # auto | tensorrt | onnxruntime | torch
    device: str = "cpu"
    precision: str = "fp32"  # torch backend: fp32 | bf16 | fp16
    tta: str = "none"  # none | flip (average each frame's logits with its mirror's; about 2x the compute)
    threads: int | None = None
    publish: str = "tcp://127.0.0.1:5555"
    namespace: str = "segnet"
    frame_id: str = "camera"
    loop: bool = False
    realtime: bool = False
    resize: str | None = None  # HxW, like every size in this project
    skip: int = 0
    max_frames: int | None = None
    image_encoding: str = "bgr8"
    mask_encoding: str = "mono8"  # mono8 | png
    class_map: str | None = None  # YAML: output classes as groups of the model's (see perception/core/class_map.py)
    overlay_alpha: float = 0.5
    legend: bool = True
    wait_for_subscribers: int = 0
    wait_timeout: float | None = None
    stats_period: float = 1.0
    info_period: float = 5.0
    mc_samples: int = 8
    sndhwm: int = 8
    log_period: float = 10.0  # seconds between status lines on stderr; 0 for none
    reconnect_attempts: int = 5
    stall_timeout: float = 5.0
    curve_secret_key: str | None = None  # the node's key pair (server.key_secret): CURVE on
    curve_allow: str | None = None  # client public keys admitted: a .key file or a folder of them


# Allowed values, checked at start (with the types the dataclass declares) so that a bad option fails
# before any source opens, naming the option: (check, what is allowed).
_RANGES: dict[str, tuple[Any, str]] = {
    "skip": (lambda v: v >= 0, ">= 0"),
    "max_frames": (lambda v: v >= 1, ">= 1"),
    "overlay_alpha": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "wait_for_subscribers": (lambda v: v >= 0, ">= 0"),
    "wait_timeout": (lambda v: v > 0, "> 0"),
    "stats_period": (lambda v: v > 0, "> 0"),
    "info_period": (lambda v: v > 0, "> 0"),
    "mc_samples": (lambda v: v >= 1, ">= 1"),
    "sndhwm": (lambda v: v >= 1, ">= 1"),
    "log_period": (lambda v: v >= 0, ">= 0"),
    "reconnect_attempts": (lambda v: v >= 0, ">= 0"),
    "stall_timeout": (lambda v: v > 0, "> 0"),
    "threads": (lambda v: v >= 1, ">= 1"),
    "backend": (lambda v: v in ("auto", "tensorrt", "onnxruntime", "torch"), "auto, tensorrt, onnxruntime or torch"),
    "precision": (lambda v: v in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16"),
    "tta": (lambda v: v in ("none", "flip"), "none or flip"),
    "image_encoding": (lambda v: v in ("bgr8", "jpeg"), "bgr8 or jpeg"),
    "mask_encoding": (lambda v: v in ("mono8", "png"), "mono8 or png"),
}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_config(cfg: NodeConfig) -> NodeConfig:
    """Check every value against its declared type and allowed range; ValueError names the option."""
    for f in dataclasses.fields(NodeConfig):
        value = getattr(cfg, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None:
            if "None" not in kinds:
                raise ValueError(f"{_option(f.name)} needs a value")
            continue
        ok = (("bool" in kinds and isinstance(value, bool))
              or ("int" in kinds and isinstance(value, int) and not isinstance(value, bool))
              or ("float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool))
              or ("str" in kinds and isinstance(value, str))
              or ("list[str]" in kinds and isinstance(value, list) and value
                  and all(isinstance(v, str) for v in value)))
        if not ok:
            expected = " or ".join(k.replace("list[str]", "list of strings") for k in kinds if k != "None")
            raise ValueError(f"{_option(f.name)} must be {'an' if expected[0] in 'aeiou' else 'a'} {expected}, "
                             f"got {value!r}")
        check = _RANGES.get(f.name)
        if check is not None and not check[0](value):
            raise ValueError(f"{_option(f.name)} must be {check[1]}, got {value!r}")
    parse_hw(cfg.resize, option="--resize")
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append",
                   help="video file, image, folder/glob, camera index or /dev/videoN, rtsp://, http(s)://, "
                        "synthetic://; repeat for several cameras, each optionally named NAME=URI "
                        "(topics become <namespace>/<name>/<stream>)")
    p.add_argument("--model", help="model folder, .onnx or .engine (default: models/segnet_basic_camvid)")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime", "torch"))
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="torch backend precision")
    p.add_argument("--tta", choices=("none", "flip"),
                   help="flip: average each frame's logits with its mirror's (about 2x the compute; see docs/benchmarks.md)")
    p.add_argument("--threads", type=int, help="inference threads")
    p.add_argument("--publish", help="ZeroMQ endpoint to bind (default tcp://127.0.0.1:5555)")
    p.add_argument("--namespace", help="topic prefix (default segnet)")
    p.add_argument("--frame-id", help="frame_id in headers (default camera)")
    p.add_argument("--config", help="YAML file of options (see launch/)")
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None, help="restart files at the end")
    p.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=None,
                   help="pace files at their native frame rate (default: as fast as possible)")
    p.add_argument("--resize", help="resize frames to HxW (height x width, e.g. 360x480) before anything else")
    p.add_argument("--skip", type=int, help="drop N frames after each one kept")
    p.add_argument("--max-frames", type=int)
    p.add_argument("--image-encoding", choices=("bgr8", "jpeg"), help="for color_mask and overlay")
    p.add_argument("--mask-encoding", choices=("mono8", "png"),
                   help="mask as raw class ids (mono8, default) or a lossless PNG, several times smaller "
                        "(for wireless links; docs/benchmarks.md)")
    p.add_argument("--class-map", metavar="FILE",
                   help="YAML of output classes as groups of the model's (e.g. drivable: [Road]); masks, colours, "
                        "legend, info and class_pixels follow it (examples in launch/class_maps/)")
    p.add_argument("--overlay-alpha", type=float)
    p.add_argument("--legend", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--wait-for-subscribers", type=int, help="hold the first frame until N subscribers joined")
    p.add_argument("--wait-timeout", type=float, help="seconds to wait for subscribers (default: forever)")
    p.add_argument("--stats-period", type=float)
    p.add_argument("--info-period", type=float)
    p.add_argument("--mc-samples", type=int, help="MC dropout samples for uncertainty (Bayesian models)")
    p.add_argument("--log-period", type=float, help="seconds between status lines on stderr (0: none)")
    p.add_argument("--reconnect-attempts", type=int,
                   help="live sources: reconnect attempts (exponential backoff) before giving up, at start too "
                        "(default 5; 0: fail at once)")
    p.add_argument("--stall-timeout", type=float,
                   help="live sources: seconds without a frame before stats say stalled (default 5)")
    p.add_argument("--curve-secret-key", metavar="FILE",
                   help="CURVE: the node's key pair (server.key_secret from perception-keys); encrypts every stream")
    p.add_argument("--curve-allow", metavar="FILE_OR_DIR",
                   help="CURVE: client public keys (.key) admitted; anyone else receives nothing")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    return p


def load_config(args: argparse.Namespace) -> NodeConfig:
    values: dict[str, Any] = {}
    if args.config:
        values.update(_relative_to(Path(args.config).parent, load_yaml_options(args.config)))
    skip = {"config", "print_config", "source"}
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in skip})
    if args.source:  # flags replace the file's cameras
        values.pop("sources", None)
        values.pop("source", None)
        if len(args.source) == 1:
            values["source"] = args.source[0]
        else:
            values["sources"] = list(args.source)
    known = {f.name for f in dataclasses.fields(NodeConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    return validate_config(NodeConfig(**values))


_PATH_OPTIONS = ("model", "source", "curve_secret_key", "curve_allow", "class_map")


def _relative_to(folder: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Relative file paths in a launch file name files next to it (wherever the node is started
    from); URIs, camera indices and /dev paths are left alone. Paths given as flags stay relative to
    the working directory, as on any command line."""
    def resolve(v: str) -> str:
        if v and "://" not in v and not v.isdigit() and not Path(v).is_absolute():
            return str(folder / v)
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


def resolve_backend(cfg: NodeConfig):
    """The backend the node config asks for (see :mod:`perception.inference.resolve`)."""
    from perception.inference.resolve import resolve_backend as resolve

    return resolve(cfg.model, backend=cfg.backend, device=cfg.device, precision=cfg.precision,
                   mc_samples=cfg.mc_samples, threads=cfg.threads, tta=cfg.tta)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from perception.core.cli import stop_on_signals
    from perception.stream.node.pipeline import Node, NodeSettings
    from perception.stream.publisher import Publisher, PublisherError
    from perception.stream.node.sources import SourceError, SourceOptions, open_source

    def fail(msg: str) -> int:
        print(f"perception-node: error: {msg}", file=sys.stderr)
        return 2

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
    multi = len(specs) > 1  # one camera: topics and frame_id exactly as before, a NAME= prefix ignored
    print("effective config: " + json.dumps(dataclasses.asdict(cfg)), file=sys.stderr, flush=True)
    options = SourceOptions(
        loop=cfg.loop, realtime=cfg.realtime, resize=parse_hw(cfg.resize, option="--resize"), skip=cfg.skip,
        max_frames=cfg.max_frames, reconnect_attempts=cfg.reconnect_attempts, stall_timeout_s=cfg.stall_timeout,
    )
    sources = []

    def close_sources() -> None:
        for _, src in sources:
            src.close()

    for spec in specs:
        try:
            sources.append((spec, open_source(spec.uri, options)))
        except (SourceError, ValueError) as e:
            close_sources()
            return fail(f"camera {spec.name}: {e}" if multi else str(e))
    try:
        backend = resolve_backend(cfg)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        close_sources()
        return fail(f"model: {e}")
    class_map = None
    if cfg.class_map:
        from perception.core.class_map import load_class_map

        try:
            class_map = load_class_map(cfg.class_map, list(backend.classes), list(backend.palette))
        except (FileNotFoundError, ValueError) as e:
            close_sources()
            backend.close()
            return fail(str(e))
    curve = None
    if bool(cfg.curve_secret_key) != bool(cfg.curve_allow):
        close_sources()
        return fail("--curve-secret-key and --curve-allow go together")
    if cfg.curve_secret_key:
        from perception.stream.security import CurveError, CurveServer

        try:
            curve = CurveServer(cfg.curve_secret_key, cfg.curve_allow)
        except CurveError as e:
            close_sources()
            return fail(str(e))
    try:
        publisher = Publisher(cfg.publish, cfg.namespace, sndhwm=cfg.sndhwm, curve=curve)
        if not _is_local(publisher.endpoint) and curve is None:
            print(f"perception-node: warning: publishing on {publisher.endpoint}, reachable from other machines "
                  "without encryption or authentication: anyone who can connect receives every stream "
                  "(see perception-keys: --curve-secret-key/--curve-allow)",
                  file=sys.stderr, flush=True)
    except PublisherError as e:
        close_sources()
        return fail(str(e))

    settings = NodeSettings(
        frame_id=cfg.frame_id, image_encoding=cfg.image_encoding, mask_encoding=cfg.mask_encoding,
        overlay_alpha=cfg.overlay_alpha, legend=cfg.legend,
        stats_period_s=cfg.stats_period, info_period_s=cfg.info_period,
        wait_for_subscribers=cfg.wait_for_subscribers, wait_timeout_s=cfg.wait_timeout,
        log_period_s=cfg.log_period or None,
    )
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if multi:
        from perception.stream.node.cameras import run_cameras

        nodes: list = []
        stop_on_signals(lambda: [n.stop() for n in nodes])
        print(f"publishing {cfg.namespace}/<camera>/* on {publisher.endpoint} ({backend.name} backend, model "
              f"{backend.card.id}, cameras {', '.join(f'{s.name}={s.uri}' for s in specs)})", file=sys.stderr,
              flush=True)
        try:
            rc = run_cameras(sources, backend, publisher, settings, namespace=cfg.namespace,
                             frame_id_given=args.frame_id is not None or cfg.frame_id != "camera", log=log,
                             class_map=class_map, on_nodes=nodes.extend)
        finally:
            publisher.close()
            backend.close()
        for spec, node in zip(specs, nodes):
            c = node.counters
            print(f"done [{spec.name}]: {c.processed} frames processed, {c.skipped} skipped without subscribers, "
                  f"{c.dropped} dropped", file=sys.stderr, flush=True)
        return rc

    source = sources[0][1]
    node = Node(source, backend, publisher, settings, log=log, class_map=class_map)
    stop_on_signals(node.stop)
    print(f"publishing {cfg.namespace}/* on {publisher.endpoint} ({backend.name} backend, model "
          f"{backend.card.id}, source {specs[0].uri})", file=sys.stderr, flush=True)
    try:
        rc = node.run()
    finally:
        publisher.close()
        backend.close()
    c = node.counters
    print(f"done: {c.processed} frames processed, {c.skipped} skipped without subscribers, {c.dropped} dropped",
          file=sys.stderr, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
