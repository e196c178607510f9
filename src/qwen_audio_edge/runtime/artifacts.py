"""The artifacts directory (the only contract between export/ and the runtime): manifest read + verify.

`manifest.json` lists every file with its sha256 and size; `load_manifest` refuses a directory whose
format version we do not read, a listed file that is missing, or one whose size/hash differ, naming
the file and what to do. Writing lives in export/package.py; both use the constants here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactsError

MANIFEST = "manifest.json"
FORMAT_NAME = "qwen-audio-edge-artifacts"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifacts:
    """A verified artifacts directory: its root and parsed manifest."""

    root: Path
    manifest: dict

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def text_config(self) -> dict:
        return self.manifest["config"]["text"]

    @property
    def audio_config(self) -> dict:
        return self.manifest["config"]["audio"]

    @property
    def audio_token_id(self) -> int:
        return int(self.manifest["config"]["audio_token_id"])

    def json(self, rel: str) -> dict:
        return json.loads(self.path(rel).read_text())


def load_manifest(root: str | Path, *, verify_hashes: bool = True) -> Artifacts:
    """Read and check `root/manifest.json`; with `verify_hashes` every listed file's sha256 is recomputed."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactsError(f"artifacts directory not found: {root} (create one with `qwen-audio-edge export`)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactsError(
            f"{root} has no {MANIFEST}: not an artifacts directory, or an export that did not finish; re-export"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactsError(f"{mpath} is not valid JSON ({e}); re-export") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactsError(f"{mpath} is not a {FORMAT_NAME} manifest; re-export with `qwen-audio-edge export`")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactsError(
            f"{mpath}: artifacts format version {version!r}, this runtime reads version {FORMAT_VERSION}; "
            "re-export the checkpoint with this version of qwen-audio-edge"
        )
    required = ("config", "preprocessor", "encoder", "files_role")
    absent = [k for k in required if k not in manifest]
    roles = manifest.get("files_role", {})
    absent += [f"files_role.{k}" for k in ("mel_filters", "tokenizer", "decoder_dir") if k not in roles]
    if absent:
        raise ArtifactsError(f"{mpath} lacks {', '.join(absent)}: written by an incompatible export; re-export")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactsError(f"{mpath} lists no files; re-export")
    for rel, meta in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            raise ArtifactsError(f"artifacts file missing: {rel} (listed in {MANIFEST}); re-export or restore it")
        size = p.stat().st_size
        if size != meta.get("bytes"):
            raise ArtifactsError(
                f"artifacts file {rel} has {size} bytes, manifest says {meta.get('bytes')}: corrupted or truncated; re-export"
            )
        if verify_hashes and sha256_file(p) != meta.get("sha256"):
            raise ArtifactsError(f"artifacts file {rel} fails its sha256 check: corrupted or modified; re-export")
    return Artifacts(root=root, manifest=manifest)
