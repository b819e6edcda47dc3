"""The service stands on its own: serving imports nothing of the offline trainer or its libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serving_imports_nothing_from_the_trainer_or_its_libraries():
    code = ("import json, sys, service.app, service.cli; "
            "print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in {'trainer', 'bm25s', 'matplotlib'})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_image_ships_the_service_not_the_trainer():
    copies = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    assert "service" in copies and not any(c.startswith("trainer") for c in copies)
