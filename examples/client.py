"""A Python client for a running ttsd, with nothing but the standard library.

    python examples/client.py "Text to speak." out.wav [--socket PATH]

The socket is --socket, else TTSD_SOCKET, else the daemon's default: /run/ttsd/ttsd.sock as root,
$XDG_RUNTIME_DIR/ttsd/ttsd.sock otherwise (without it, under /run/user/UID or /tmp/runtime-UID).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=300)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def default_socket() -> str:
    if path := os.environ.get("TTSD_SOCKET"):
        return path
    if os.geteuid() == 0:
        return "/run/ttsd/ttsd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:  # where the daemon's platformdirs falls back to
        runtime = f"/run/user/{os.getuid()}"
        runtime = runtime if os.path.isdir(runtime) else f"/tmp/runtime-{os.getuid()}"
    return os.path.join(runtime, "ttsd", "ttsd.sock")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("text")
    parser.add_argument("out")
    parser.add_argument("--socket", default=default_socket())
    parser.add_argument("--voice")
    args = parser.parse_args()
    body = {"text": args.text, "stream": True}
    if args.voice:
        body["voice"] = args.voice
    conn = UnixHTTPConnection(args.socket)
    try:
        conn.request("POST", "/v1/synthesize", body=json.dumps(body), headers={"Content-Type": "application/json"})
    except OSError as exc:  # no socket there, or no daemon behind it
        print(f"no ttsd answers on {args.socket} ({exc.strerror or exc}); start one with 'ttsd serve'", file=sys.stderr)
        return 2
    response = conn.getresponse()
    if response.status != 200:
        error = json.loads(response.read())["error"]
        print(f"ttsd said {response.status}: {error['message']}", file=sys.stderr)
        return 1
    with open(args.out, "wb") as out:  # streamed: write each piece as it arrives
        while chunk := response.read1(65536):
            out.write(chunk)
    print(f"{args.out}: voice {response.getheader('X-Ttsd-Voice')} {response.getheader('X-Ttsd-Version')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
