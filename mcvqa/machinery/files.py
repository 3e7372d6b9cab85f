"""## Files: every output is written whole or not at all

A Kaggle session can be killed at any moment (12 h limit, a lost kernel). Everything the run reads back
(checkpoints, adapters, cached features, demo images and tables, the submission) is written to a
temporary file in the target folder and moved into place with `os.replace`, which is atomic within one
filesystem: a crash leaves the old file or the new one, never half of one.
"""

import json
import os
import pathlib
import tempfile


def atomic_write(path, write):
    """write(temporary path) then move it to `path` (made readable: 0644); the temporary file is removed
    when `write` fails."""
    path = pathlib.Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temp_name)
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600
        os.replace(temp_name, path)
    except BaseException:
        pathlib.Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def read_json(path):
    """A run folder's JSON file (config.json, metrics.json), or {} when it is not there."""
    path = pathlib.Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
