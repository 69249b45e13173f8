"""The pulse process stays small: nothing of the API stack is imported on its side."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("fastapi", "starlette", "uvicorn", "httpx", "vipfarm.api", "vipfarm.supervisor")


def test_the_pulse_imports_nothing_of_the_management_plane() -> None:
    code = (
        "import sys, vipfarm.node.pulse, vipfarm.config\n"
        f"print(sorted({{m.split('.')[0] if not m.startswith('vipfarm') else m for m in sys.modules"
        f" if m.startswith({HEAVY!r})}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
