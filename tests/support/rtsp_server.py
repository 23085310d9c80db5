"""A real RTSP server for tests: GStreamer's gst-rtsp-server serving an H.264 MP4 in a loop.

Run by the system python3 (PyGObject comes from Debian: python3-gi, gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-good/-bad):

    /usr/bin/python3 tests/support/rtsp_server.py PORT VIDEO.mp4

Serves rtsp://127.0.0.1:PORT/stream and prints "ready" once it listens.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> int:
    port, video = sys.argv[1], sys.argv[2]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    # One pipeline shared by every client; h264parse re-sends SPS/PPS so late joiners can decode.
    factory.set_launch(f'( filesrc location="{video}" ! qtdemux ! h264parse config-interval=-1 '
                       "! rtph264pay name=pay0 pt=96 )")
    factory.set_shared(True)
    server.get_mount_points().add_factory("/stream", factory)
    if server.attach(None) == 0:
        print("cannot listen", flush=True)
        return 1
    print("ready", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
