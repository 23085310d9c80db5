"""The consumers of a node's streams: ``perception-echo`` (print), ``perception-record`` (files or a ROS 2
bag, ``rosbag``), ``perception-foxglove`` (a live Foxglove bridge) and ``perception-view`` (a live browser
page). Each follows the node through :func:`perception.stream.client.follow`.

The stream package at a glance: the producer is ``stream.node`` (sources, pipeline, ``perception-node``),
the transport is ``stream.protocol``, ``stream.publisher``, ``stream.client``, ``stream.security`` (CURVE),
``stream.monitor`` and ``stream.ondemand``, and the consumers are here.
"""
