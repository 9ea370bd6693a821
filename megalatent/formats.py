"""The JSON descriptions our own file formats carry (σ-VAE tokenizer directories, latent stores): a format
name and a version, checked on reading so that a file of another kind, or from newer code, fails clearly."""
from __future__ import annotations

import json


def read_format_json(path: str, name: str, version: int) -> dict:
    """The JSON object in `path`, after checking it declares format `name` at a version <= `version`."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not a readable JSON description ({e}); the file is damaged") from None
    if info.get("format") != name:
        raise ValueError(f"{path}: format {info.get('format')!r} is not {name!r}")
    if info.get("format_version", 0) > version:
        raise ValueError(f"{path}: format version {info['format_version']} is newer than this code reads "
                         f"({version}); update megalatent")
    return info
