"""The ROS 2 convention for class names (vision_msgs): a latched LabelInfo beside the mono8 mask, in
bags (read by two readers that have no vision_msgs of their own) and from the Foxglove bridge."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest

from test_hostile import GOOD_MASK, _RawNode, _h, _img


def _record(tmp_path, node, classes_sequence) -> "Path":  # noqa: F821
    from perception.stream.consumers.record import main as record_main

    def feed() -> None:
        node.wait_for("segnet/stats")
        time.sleep(0.2)  # the recorder's remaining subscriptions arrive (not a test synchronisation)
        for seq, classes in enumerate(classes_sequence):
            node.send("segnet/info", _h("msgpack", seq), msgpack.packb({"classes": classes, "model_id": "raw"}))
            node.send("segnet/mask", _img("mono8", 48, 64, seq), GOOD_MASK.tobytes())
        node.send("segnet/stats", _h("msgpack", 99), msgpack.packb({"final": True}))

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    out = tmp_path / "bag"
    assert record_main([node.endpoint, "--out", str(out), "--format", "mcap", "--timeout", "30"]) == 0
    t.join(10)
    return out


def test_bags_carry_label_info_that_two_independent_readers_decode(tmp_path):
    pytest.importorskip("mcap")
    from mcap_ros2.reader import read_ros2_messages
    from rosbags.highlevel import AnyReader
    import yaml

    node = _RawNode()
    try:
        # The same table three times, then another (e.g. a node restarted with a class map).
        tables = [["Sky", "Building", "Road"]] * 3 + [["drivable", "other"]]
        out = _record(tmp_path, node, tables)
    finally:
        node.close()
    meta = yaml.safe_load((out / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    topics = {t["topic_metadata"]["name"]: t for t in meta["topics_with_message_count"]}
    li = topics["/segnet/label_info"]
    assert li["topic_metadata"]["type"] == "vision_msgs/msg/LabelInfo" and li["message_count"] == 2
    assert "durability: 1" in li["topic_metadata"]["offered_qos_profiles"], "latched (transient local)"

    mcap_file = next(out.glob("*.mcap"))
    decoded = [m.ros_msg for m in read_ros2_messages(str(mcap_file)) if m.channel.topic == "/segnet/label_info"]
    assert [[(c.class_id, c.class_name) for c in m.class_map] for m in decoded] == [
        [(0, "Sky"), (1, "Building"), (2, "Road")], [(0, "drivable"), (1, "other")]]
    with AnyReader([out]) as reader:  # rosbags, types from the definitions stored in the bag
        conns = [c for c in reader.connections if c.topic == "/segnet/label_info"]
        msgs = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(connections=conns)]
    assert [m.class_map[2].class_name for m in msgs[:1]] == ["Road"] and msgs[1].class_map[0].class_id == 0
    assert msgs[0].header.frame_id == "camera"


def test_the_foxglove_bridge_publishes_the_class_table():
    pytest.importorskip("foxglove")
    from perception.stream.consumers.foxglove_bridge import FoxgloveBridge

    node = _RawNode()
    bridge = FoxgloveBridge(node.endpoint, port=0)
    stop = threading.Event()
    bt = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    logged = []
    channel = bridge.channels["segnet/label_info"]

    class Recorded:  # the SDK's channel, and what it was given
        def log(self, msg, **kw):
            logged.append(msg)
            channel.log(msg, **kw)

    bridge.channels["segnet/label_info"] = Recorded()
    try:
        bridge._changes.put(("segnet/label_info", 1, True))  # a Foxglove client watching label_info only
        bt.start()
        node.wait_for("segnet/info")  # the bridge subscribed upstream to what feeds it
        assert bridge.watched() == {"segnet/info"}
        node.send("segnet/info", _h("msgpack", 0), msgpack.packb({"classes": ["Sky", "Road"]}))
        deadline = time.monotonic() + 20
        while not logged and time.monotonic() < deadline:
            time.sleep(0.02)  # polling what the bridge logged
        assert logged == [{"class_map": [{"class_id": 0, "class_name": "Sky"}, {"class_id": 1, "class_name": "Road"}],
                           "threshold": 0.0}]
    finally:
        stop.set()
        bt.join(10)
        bridge.close()
        node.close()
