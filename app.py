"""The web app: python app.py [--host 127.0.0.1] [--port 7860] [--checkpoints DIR] [--device auto]

Complete 64x64 pictures and generate 12 kHz audio with the checkpoints found in --checkpoints
(NAME.safetensors + NAME.json). Serves on 127.0.0.1 only unless told otherwise; no share link,
no telemetry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.registry import Registry, pick_device
from app.ui import build_demo, launch
from sampling.compiled_step import prepare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="app.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--checkpoints", type=Path, default=Path(__file__).resolve().parent / "checkpoints",
                   metavar="DIR", help="folder of NAME.safetensors + NAME.json checkpoints (default checkpoints/)")
    p.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda or cuda:N")
    a = p.parse_args(argv)
    if not 1 <= a.port <= 65535:
        p.error(f"--port must be in 1..65535, got {a.port}")
    try:
        device = pick_device(a.device)
    except ValueError as e:
        p.error(str(e))
    registry = Registry(a.checkpoints, device)
    found = ", ".join(f"{e.name} ({e.kind})" for e in registry.entries) or "none (the page says what to do)"
    print(f"app.py: models in {a.checkpoints}: {found}; device {device}", file=sys.stderr)
    print(f"app.py: {prepare()}", file=sys.stderr)  # built now, not inside the first user's request
    try:
        launch(build_demo(registry), a.host, a.port)
    except OSError as e:  # the port is taken, or the address is not this machine's
        print(f"app.py: error: cannot serve on {a.host}:{a.port} ({e}); try another --port", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
