"""qemu-img (Debian qemu-utils), the reference the tests check image facts against."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.servers import need_program

QEMU_IMG_TIMEOUT_S = 60.0


def qemu_img_virtual_size(path: Path) -> int:
    """The virtual size in bytes that ``qemu-img info`` reports for the image at ``path``."""
    qemu_img = need_program("qemu-img", "qemu-utils")
    out = subprocess.run(
        [qemu_img, "info", "--output", "json", str(path)],
        check=True,
        capture_output=True,
        timeout=QEMU_IMG_TIMEOUT_S,
    ).stdout
    return json.loads(out)["virtual-size"]
