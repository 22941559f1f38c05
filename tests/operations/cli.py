"""The `fieldsync` command line as an operator runs it: its own process, on a data folder."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path


async def fieldsync(data_dir: Path, *args: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `fieldsync ARGS` on `data_dir` (port 0: no server is
    looked for)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    env |= {"FIELDSYNC_DATA_DIR": str(data_dir), "FIELDSYNC_PORT": "0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fieldsync",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
