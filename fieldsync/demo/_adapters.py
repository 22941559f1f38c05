"""The demo's adapters file: the ERP's section and, when there is one, the plant floor's."""

from __future__ import annotations

from pathlib import Path

from fieldsync.demo import _erp


def adapters_file(data_dir: Path, plant_floor: str) -> Path:
    """Write the demo's adapters file in its data folder and return it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "adapters.toml"
    path.write_text("# Written by `fieldsync demo`.\n" + _erp.section(data_dir) + plant_floor)
    return path
