"""`dsc matrix` against a shell loop of `dsc build`, one run each, on the same host.

    .venv/bin/python benchmarks/matrix_vs_loop.py [--out /tmp/matrix-bench]

The matrix: 2 tiny random checkpoints (llama, qwen2; `dsc.fixtures.make_fixture`) x fp16/int8
x rtx-4090/a100-80gb (8 engines in 4 artifacts), `--samples 4 --seq-len 32 --max-input-len 64
--max-batch 1`, smoke validation. Three ways, each into an empty directory:

1. serial loop: the 4 `dsc build` command lines `dsc matrix --plan --json` prints, one after
   the other (each exports its model again, and each build compiles both profiles);
2. `dsc matrix --executor local` (workers: the host's cores);
3. `dsc matrix --executor ray` on a one-node cluster started here with `--num-cpus 2`
   (2 workers), stopped afterwards.

Prints wall time and the number of export / quantize / compile stages each ran, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DSC = [sys.executable, "-m", "dsc"]


def _matrix(root: Path) -> Path:
    from dsc.fixtures import make_fixture, train_tokenizer

    tok = train_tokenizer(root / "tokenizer")
    models = [make_fixture(f, root / f, tokenizer_dir=tok) for f in ("llama", "qwen2")]
    p = root / "matrix.yaml"
    p.write_text(
        "models:\n"
        + "".join(f"  - {m}\n" for m in models)
        + "precisions: [fp16, int8]\nprofiles: [rtx-4090, a100-80gb]\n"
        + "options:\n  calib_samples: 4\n  calib_seq_len: 32\n  max_input_len: 64\n"
        + "  max_batch: 1\n  validate: smoke\n"
    )
    return p


def _count(out: Path) -> dict:
    """Stages that ran, from the artifacts' manifests (a loop's builds ran every stage)."""
    n = {"export": 0, "quantize": 0, "compile": 0}
    for m in out.glob("*/*/manifest.json"):
        st = json.loads(m.read_text())["stages"]
        for k in ("export", "quantize"):
            n[k] += st[k]["status"] == "ran"
        n["compile"] += sum(r["status"] == "ran" for r in st["compile"]["profiles"].values())
    return n


def loop(mfile: Path, out: Path) -> dict:
    plan = json.loads(
        subprocess.check_output([*DSC, "matrix", str(mfile), "-o", str(out), "--plan", "--json"])
    )
    t0 = time.perf_counter()
    for c in plan["cells"]:
        subprocess.run([*DSC, *c["argv"][1:], "-q"], check=True)
    return {"seconds": round(time.perf_counter() - t0, 1), "stages": _count(out)}


def matrix(mfile: Path, out: Path, *extra: str) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(
        [*DSC, "matrix", str(mfile), "-o", str(out), "--json", *extra],
        check=True,
        capture_output=True,
        text=True,
    )
    doc = json.loads(r.stdout)
    ran = doc["stages"]["ran"]
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "stages": {k: ran.get(k, 0) for k in ("export", "quantize", "compile")},
    }


def ray_cluster():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--object-store-memory=400000000",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(180):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    time.sleep(3)
    return proc, f"127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="matrix-bench-")))
    args = ap.parse_args()
    root = args.out
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    mfile = _matrix(root)
    result = {"loop": loop(mfile, root / "loop")}
    result["local"] = matrix(mfile, root / "local")
    proc, address = ray_cluster()
    try:
        result["ray (2 workers)"] = matrix(
            mfile, root / "ray", "--executor", "ray", "--address", address
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    base = result["loop"]["seconds"]
    for r in result.values():
        r["vs_loop"] = round(r["seconds"] / base, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
