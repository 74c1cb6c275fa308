"""Golden files: compare text with tests/golden/<name>; BTM_UPDATE_GOLDEN=1 rewrites them."""
import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("BTM_UPDATE_GOLDEN") == "1" or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if os.environ.get("BTM_UPDATE_GOLDEN") != "1":
            raise AssertionError(f"golden file {path} was missing and has been written; check it and re-run")
    assert text == path.read_text(), f"output differs from {path} (BTM_UPDATE_GOLDEN=1 to accept)"
