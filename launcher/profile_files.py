"""Where cluster profiles live: ``$BTM_PROFILE_DIR`` first when set, then
``slurm_templates/profiles/*.yaml``. The config checks a profile's name against these files;
launcher/profiles.py reads them."""
from __future__ import annotations

import os
from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parents[1] / "slurm_templates" / "profiles"


def profile_dirs() -> list[Path]:
    extra = os.environ.get("BTM_PROFILE_DIR")
    return ([Path(extra)] if extra else []) + [PROFILE_DIR]


def known_profiles() -> list[str]:
    names = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)
