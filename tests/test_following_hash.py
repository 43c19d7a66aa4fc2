"""`_FollowingHash`: the sha256 of model.onnx.data computed behind its writer. It hashes only
bytes whose tensors (and every tensor before them) are written, gets the digest of the whole
file byte for byte, falls back (None) when offsets are not in index order, and stops on
`stop`; the export's manifest records the same digest as reading the file afterwards."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from dsc import api
from dsc.export.onnx_export import _FollowingHash
from dsc.models.checkpoint import HashCancelled, sha256_file


def _layout(sizes, align=64):
    """Offsets as onnx_ir lays tensors out: each after the last one's end, aligned."""
    spans, offset = [], 0
    for n in sizes:
        offset = -(-offset // align) * align
        spans.append((offset, n))
        offset += n
    return spans, offset


def _write(f, offset, n, value):
    f.seek(offset)
    f.write(bytes([value]) * n)
    f.flush()


def test_hashes_behind_the_writer_and_gets_the_whole_file(tmp_path, monkeypatch):
    """Two writer threads finish tensors out of order, with holes between them; the hash
    reads only bytes whose tensors up to there are written (checked against a record of what
    was written when each range was read), one tensor never reports (held until the end), and
    the digest is the file's."""
    path = tmp_path / "model.onnx.data"
    sizes = [1000, 70, 5000, 33, 4096, 10, 2500, 800]
    spans, total = _layout(sizes)
    with open(path, "wb") as f:
        f.truncate(total)
    stop = threading.Event()
    follower = _FollowingHash(path, stop=stop)
    follower.CHUNK = 512  # several reads per tensor
    written = set()
    ranges = []
    from dsc.models import checkpoint

    hash_into = checkpoint.hash_into

    def spy(h, fh, view, *, pos=0, end=None, stop=None):
        last = end if end is not None else total
        for i, (offset, n) in enumerate(spans):
            if offset < last and offset + n > pos:
                assert i in written or end is None, (i, pos, end)
        ranges.append((pos, end))
        return hash_into(h, fh, view, pos=pos, end=end, stop=stop)

    monkeypatch.setattr(checkpoint, "hash_into", spy)
    follower.start()
    silent = 5  # written, but never reports it (not one of dsc's lazy tensors)
    order = {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}
    turns = [threading.Event() for _ in sizes]
    turns[1].set()

    def writer(indices):
        with open(path, "r+b") as f:
            for i in indices:
                turns[i].wait(10)
                offset, n = spans[i]
                follower.started(i, offset, n)
                _write(f, offset, n, i + 1)
                written.add(i)
                if i != silent:
                    follower.written(f)
                nxt = {1: 0, 0: 3, 3: 2, 2: 5, 5: 4, 4: 7, 7: 6}.get(i)
                if nxt is not None:
                    turns[nxt].set()

    threads = [threading.Thread(target=writer, args=(order[k],)) for k in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    follower.finished()
    assert follower.digest.result(10) == sha256_file(path)
    assert any(end is not None for _, end in ranges), ranges  # some hashed before the end
    first_silent = spans[silent][0]
    assert all(end is None or end <= first_silent for _, end in ranges), ranges


def test_offsets_out_of_index_order_give_no_digest(tmp_path):
    path = tmp_path / "model.onnx.data"
    path.write_bytes(b"x" * 300)
    follower = _FollowingHash(path, stop=threading.Event())
    follower.start()
    with open(path, "rb") as f:
        follower.started(0, 100, 100)
        follower.written(f)
        follower.started(1, 0, 100)  # below what is already final
        follower.written(f)
    follower.finished()
    assert follower.digest.result(10) is None


def test_a_file_renamed_while_it_is_hashed_is_still_hashed(tmp_path):
    """onnx_ir writes into a temporary file and renames it over the destination at the end:
    the hash follows the file it was told of, through the rename; with no tensor reporting
    it hashes the destination once the save is done."""
    tmp, final = tmp_path / "tmp" / "model.onnx.data", tmp_path / "model.onnx.data"
    tmp.parent.mkdir()
    follower = _FollowingHash(final, stop=threading.Event())
    follower.start()
    with open(tmp, "wb") as f:
        follower.started(0, 0, 3000)
        _write(f, 0, 3000, 7)
        follower.written(f)
        follower.started(1, 3000, 5)
        _write(f, 3000, 5, 9)
    tmp.rename(final)
    follower.finished()
    assert follower.digest.result(10) == sha256_file(final)
    quiet = _FollowingHash(final, stop=threading.Event())
    quiet.start()
    quiet.started(0, 0, 3005)
    quiet.finished()
    assert quiet.digest.result(10) == sha256_file(final)


def test_stop_cancels_a_waiting_hash(tmp_path):
    path = tmp_path / "model.onnx.data"
    path.write_bytes(b"")
    stop = threading.Event()
    follower = _FollowingHash(path, stop=stop)
    follower.start()
    follower.started(0, 0, 10)
    stop.set()
    with pytest.raises(HashCancelled):
        follower.digest.result(10)


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
@pytest.mark.parametrize("prewrite", ["0", "1"], ids=["onnx_ir", "prewrite"])
def test_the_manifest_records_the_written_files_digest(
    tmp_path, checkpoints, family, prewrite, monkeypatch
):
    """The export hashes model.onnx.data behind its writer (onnx_ir's, or the second
    process's: `dsc.export.prewrite`); the manifest's digest is the file's, read afterwards."""
    monkeypatch.setenv("DSC_PREWRITE", prewrite)
    out = tmp_path / "out"
    api.export(checkpoints[family], out, dtype="fp16", external_data=True, progress=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = json.dumps(manifest)
    digest = hashlib.sha256((out / "model.onnx.data").read_bytes()).hexdigest()
    assert digest in recorded
