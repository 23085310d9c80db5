"""The torch-free core: one size parser (HxW everywhere) whose errors name the option."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import make_video
from perception.core.sizes import parse_hw


@pytest.mark.parametrize("value,expected", [("360x480", (360, 480)), ("24X32", (24, 32)), ((5, 7), (5, 7)),
                                            ([5, 7], (5, 7)), (None, None)])
def test_parse_hw(value, expected):
    assert parse_hw(value, option="--size") == expected


def test_parse_hw_words_and_errors():
    assert parse_hw("none", option="--crop", none_words=("none", "full")) is None
    assert parse_hw("dynamic", option="--size", keep_words=("dynamic",)) == "dynamic"
    for bad in ("480", "10x", "axb", "1x2x3", "lots"):
        with pytest.raises(ValueError, match=r"^--resize must be HxW \(height x width"):
            parse_hw(bad, option="--resize")
    for small in ("0x0", "-10x10"):
        with pytest.raises(ValueError, match="--resize .* is too small"):
            parse_hw(small, option="--resize")
    with pytest.raises(ValueError, match="crop 16x16 is too small: both sides must be at least 32"):
        parse_hw("16x16", option="crop", minimum=32)


def test_every_cli_reads_sizes_as_height_by_width(tmp_path, capsys, toy_model):
    from perception.export.cli import parse_size
    from perception.stream.node.cli import main as node_main
    from perception.train.config import build_config

    assert build_config(overrides={"crop": "240x320"}).crop == (240, 320)
    assert parse_size("360x480") == (360, 480)
    video = make_video(tmp_path / "v.avi", n=2)
    assert node_main(["--source", str(video), "--model", str(toy_model[1]), "--resize", "0x0"]) == 2
    assert "--resize 0x0 is too small" in capsys.readouterr().err


def test_class_maps_group_relabel_and_fail_naming_the_models_classes(tmp_path):
    from pathlib import Path

    from perception.core.class_map import load_class_map, parse_class_map
    from perception.core.classes import CAMVID_CLASSES, CAMVID_PALETTE

    classes, palette = list(CAMVID_CLASSES), [tuple(c) for c in CAMVID_PALETTE]
    m = parse_class_map({"drivable": {"from": ["Road"], "color": [1, 2, 3]}, "obstacle": ["Car", "Pedestrian"],
                         "other": "*"}, classes, palette)
    assert m.classes == ["drivable", "obstacle", "other"]
    assert m.palette == [(1, 2, 3), palette[classes.index("Car")], (64, 64, 64)]
    labels = np.arange(11, dtype=np.uint8).reshape(1, 11)
    expected = [2] * 11
    expected[classes.index("Road")] = 0
    expected[classes.index("Car")] = expected[classes.index("Pedestrian")] = 1
    assert m.apply(labels).tolist() == [expected]
    # Without a catch-all, the rest is unlabelled: 255, vision_msgs' UNLABELED for mono8 masks.
    m = parse_class_map({"road": ["Road"]}, classes, palette)
    assert m.classes == ["road"] and m.unlabeled == 255
    assert m.apply(labels).tolist() == [[0 if c == "Road" else 255 for c in classes]]
    assert parse_class_map({"road": ["Road"], "rest": "*"}, classes, palette).unlabeled is None
    for spec, text in [({"x": ["Lorry"]}, "unknown class 'Lorry'; the model's classes are: Sky, Building"),
                       ({"x": ["Road"], "y": ["Road"]}, "'Road' is already in 'x'"),
                       ({"x": "*", "y": "*"}, "only one catch-all"),
                       ({"x": {"from": ["Road"], "color": [300, 0, 0]}}, "integers 0-255"),
                       ({"x": 3}, "list of model class names"), ([], "expected a mapping")]:
        with pytest.raises(ValueError, match=re.escape(text)):
            parse_class_map(spec, classes, palette)
    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "launch" / "class_maps").glob("*.yaml")):  # the shipped examples load
        assert load_class_map(path, classes, palette).classes


@pytest.mark.parametrize("cli", ["node", "train"])
def test_flags_and_yaml_keys_come_from_one_typed_config(cli, tmp_path):
    """Every field of a CLI's config dataclass is a flag (unless marked YAML-only) and every flag is a
    field (besides the CLI's own --config/--resume...); defaults < YAML < flags."""
    import dataclasses

    if cli == "node":
        from perception.stream.node.cli import NodeConfig as Config, build_parser, load_config
        own = {"help", "config", "print_config", "source"}
    else:
        pytest.importorskip("torch")
        from perception.train.cli import build_parser
        from perception.train.config import TrainConfig as Config
        own = {"help", "config", "resume", "no_progress"}
    dests = {a.dest for a in build_parser()._actions}
    fields = {f.name: f for f in dataclasses.fields(Config)}
    cli_fields = {n for n, f in fields.items() if f.metadata.get("option", {}).get("cli", True)}
    assert cli_fields <= dests, f"fields without a flag: {sorted(cli_fields - dests)}"
    assert dests - own <= set(fields), f"flags without a field: {sorted(dests - own - set(fields))}"
    if cli == "node":
        yaml_file = tmp_path / "n.yaml"
        yaml_file.write_text("namespace: from_yaml\nstats_period: 3\nskip: 2\n")
        cfg = load_config(build_parser().parse_args(["--config", str(yaml_file), "--skip", "5"]))
        assert (cfg.namespace, cfg.stats_period, cfg.skip, cfg.info_period) == ("from_yaml", 3, 5, 5.0)


def test_node_stage_settings_take_the_node_configs_names():
    """SourceOptions and NodeSettings are projections of NodeConfig: every field the config also has
    carries the config's value under the same name (nothing copied or renamed by hand)."""
    import dataclasses

    from perception.core.options import project
    from perception.stream.node.cli import NodeConfig
    from perception.stream.node.pipeline import NodeSettings
    from perception.stream.node.sources import SourceOptions

    config_names = {f.name for f in dataclasses.fields(NodeConfig)}
    internal = {"queue_size", "reconnect_backoff_s"}  # not options of the node
    for cls in (SourceOptions, NodeSettings):
        names = {f.name for f in dataclasses.fields(cls)}
        assert names - internal <= config_names, f"{cls.__name__} fields not in NodeConfig: {names - internal - config_names}"
    cfg = NodeConfig(stall_timeout=2.5, skip=3, loop=True, stats_period=0.25, info_period=7.0, wait_timeout=9.0,
                     log_period=0.0, frame_id="cam_front", mask_encoding="png", overlay_alpha=0.3)
    src = project(SourceOptions, cfg, resize=(90, 120))
    assert (src.stall_timeout, src.skip, src.loop, src.resize) == (2.5, 3, True, (90, 120))
    assert src.reconnect_backoff_s == SourceOptions().reconnect_backoff_s  # not in the config: its default
    s = project(NodeSettings, cfg)
    assert (s.stats_period, s.info_period, s.wait_timeout, s.log_period, s.frame_id, s.mask_encoding,
            s.overlay_alpha) == (0.25, 7.0, 9.0, 0.0, "cam_front", "png", 0.3)
    with pytest.raises(TypeError):
        project(SourceOptions, cfg, no_such_field=1)
