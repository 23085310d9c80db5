"""Streaming: the wire protocol, the publisher, the subscriber client, the node, echo and record."""
