"""What every stage shares: the record it returns, its input hash, and reuse of its outputs.

A stage declares its inputs as plain data (content hashes of what it reads, its options, the
tool versions that shape its output); `Stage.input_hash` is the one function that turns them
into the `input_hash` of its manifest record. A stage whose recorded input hash is unchanged
and whose recorded outputs are intact (re-hashed) is reused: its files are hard-linked from the
previous artifact.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc.artifacts import MANIFEST, is_external_data
from dsc.manifest import canonical_hash, relpath
from dsc.models.checkpoint import sha256_file
from dsc.paths import contained


@dataclass
class StageRecord:
    """One stage's entry in `manifest.stages` (`to_json()` is that entry, key order included).

    `status`: ran | reused | not_run | skipped. `seconds` wall time, `peak_rss_bytes` the
    process's peak resident set while the stage ran; `extra` holds the stage's own fields
    (the optimize stage's pass counts, the quantize stage's scheme, ...)."""

    status: str
    input_hash: str | None = None
    inputs: dict | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None
    peak_rss_bytes: int | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def not_run(cls, reason: str) -> StageRecord:
        return cls("not_run", reason=reason)

    def to_json(self) -> dict:
        if self.status == "not_run":
            return {"status": "not_run", "reason": self.reason}
        d: dict[str, Any] = {"status": self.status}
        if self.reason is not None:
            d["reason"] = self.reason
        d.update(input_hash=self.input_hash, inputs=self.inputs, outputs=self.outputs)
        if self.seconds is not None:
            d["seconds"] = round(self.seconds, 2)
        if self.peak_rss_bytes is not None:
            d["peak_rss_bytes"] = self.peak_rss_bytes
        d.update(self.extra)
        return d


class Stage:
    """A pipeline stage: `name`, its position `index` in `dsc build`, and one input hash."""

    name: str = ""
    index: int = 0

    @staticmethod
    def input_hash(inputs: dict) -> str:
        """sha256 of the canonical JSON of `inputs`: the only place a stage's inputs are hashed."""
        return canonical_hash(inputs)

    def __repr__(self) -> str:
        return f"<stage {self.index} {self.name}>"

    def line(self, progress, text: str) -> str:
        return progress.stage_line(self.index, self.name, text)


def files(root: Path) -> set[str]:
    """Relative paths of the files under `root` (names only: no hashing)."""
    return {relpath(p, root) for p in root.rglob("*") if p.is_file()}


def link(src_root: Path, dst_root: Path, rels) -> None:
    """Hard-link (or copy) files of the previous artifact into the one being written.

    ONNX external-data files are copied, never linked: onnx and onnx-ir refuse to read a data
    file with more than one hard link (a guard against tampering through a shared inode)."""
    for rel in rels:
        src, dst = contained(src_root, rel), contained(dst_root, rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()
        if is_external_data(rel):
            shutil.copy2(src, dst)
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def intact(root: Path | None, outputs: dict) -> bool:
    """Whether every file in `outputs` ({relative path: sha256}) is under `root` unchanged."""
    if root is None:
        return False
    for rel, digest in outputs.items():
        p = contained(root, rel, what=f"{MANIFEST} of {root} names")
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True


def reusable(old: dict | None, input_hash: str, root: Path | None) -> bool:
    """Whether the recorded stage `old` may be reused for `input_hash` from artifact `root`."""
    return (
        bool(old)
        and old.get("status") in ("ran", "reused")
        and old.get("input_hash") == input_hash
        and intact(root, old.get("outputs", {}))
    )


def reused(old: dict) -> dict:
    return dict(old, status="reused")
