"""The demo's adapters file: the ERP's section and, when there are, the plant floor's and the
directory's."""

from __future__ import annotations

from pathlib import Path

from fieldsync.demo import _erp


def adapters_file(data_dir: Path, sections: str) -> Path:
    """Write the demo's adapters file in its data folder and return it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "adapters.toml"
    path.write_text("# Written by `fieldsync demo`.\n" + _erp.section(data_dir) + sections)
    return path
