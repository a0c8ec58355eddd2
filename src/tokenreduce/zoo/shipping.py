"""Writing a trained zoo model into its shipped folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


def save_shipped(out: Path, *savables: Any, keep: tuple[str, ...] | None = None) -> None:
    """``save_pretrained`` each object (model, tokenizer, scheduler) into ``out`` through a scratch folder.

    Only the files named in ``keep`` are copied (all but a README.md when None), so
    whatever extra files a library version writes never reach the shipped folder
    and the model card already in ``out`` is never overwritten.
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for savable in savables:
            savable.save_pretrained(scratch)
        for path in Path(scratch).iterdir():
            if (path.name in keep) if keep is not None else path.name != "README.md":
                shutil.copyfile(path, out / path.name)
