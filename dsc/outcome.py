"""`BuildOutcome`: what `dsc build` / `dsc compile` did, as JSON (`--json`) and as text."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dsc.artifacts import MANIFEST

BUILD_LOG = "build.log"


@dataclass
class BuildOutcome:
    """What a build or compile did; `to_json()` is the `--json` document."""

    artifact: Path
    command: str
    up_to_date: bool
    seconds: float
    manifest: dict
    ran: dict[str, bool] = field(default_factory=dict)  # stage (or compile:<p>) -> ran

    def to_json(self) -> dict:
        m = self.manifest
        art = self.artifact
        stages = {}
        for name, st in m.get("stages", {}).items():
            stages[name] = {"status": st.get("status")}
            if "reason" in st:
                stages[name]["reason"] = st["reason"]
            if "seconds" in st:
                stages[name]["seconds"] = st["seconds"]
            if name == "compile":
                stages[name]["profiles"] = {
                    p: r.get("status") for p, r in st.get("profiles", {}).items()
                }
        profiles = {}
        for name, p in (m.get("profiles") or {}).items():
            eng = p.get("engine")
            profiles[name] = {
                "status": p["status"],
                "sm": p["sm"],
                "built_here": p["status"] == "built",
                "engine": str(art / eng["path"]) if eng else None,
                "engine_bytes": eng["size_bytes"] if eng else None,
                "backend": eng["backend"] if eng else None,
                "runtime": eng.get("runtime") if eng else None,
                "preflight": p.get("preflight"),
                "device_command": str(art / p["device_command"])
                if p.get("device_command")
                else None,
                "finish_on_device": (None if eng else f"dsc compile {art} --profile {name}"),
            }
        files = {"manifest": str(art / MANIFEST)}
        for key, name in (("log", BUILD_LOG), ("report", "report.html")):
            if (art / name).is_file():
                files[key] = str(art / name)
        return {
            "artifact": str(art),
            "command": self.command,
            "up_to_date": self.up_to_date,
            "seconds": round(self.seconds, 2),
            "stages": stages,
            "profiles": profiles,
            "validation": m.get("validation"),
            "files": files,
        }

    def format(self) -> str:
        """The plain-language summary printed at the end of `dsc build` / `dsc compile`."""
        d = self.to_json()
        src = self.manifest.get("source", {})
        head = (
            f"artifact {d['artifact']} is up to date (nothing to do)"
            if self.up_to_date
            else f"{'built' if self.command == 'build' else 'compiled'} artifact "
            f"{d['artifact']} ({src.get('family')}, {self.manifest.get('precision')}) "
            f"in {self.seconds:.1f}s"
        )
        lines = [head]
        built = {n: p for n, p in d["profiles"].items() if p["built_here"]}
        pending = {n: p for n, p in d["profiles"].items() if not p["built_here"]}
        width = max((len(n) for n in d["profiles"]), default=0)
        if built:
            lines.append("  engines built:")
            for n, p in built.items():
                rt = (
                    "TensorRT-RTX, ahead of time; runs with the TensorRT-RTX runtime"
                    if p["backend"] == "tensorrt_rtx"
                    else "standard TensorRT, on this GPU"
                )
                lines.append(
                    f"    {n:<{width}}  SM{p['sm']}  {p['engine']} "
                    f"({p['engine_bytes'] / 2**20:,.1f} MiB; {rt})"
                )
        if pending:
            lines.append(
                "  engines NOT built here (TensorRT-RTX cannot target them) - finish "
                "each on its device with standard TensorRT:"
            )
            for n, p in pending.items():
                pre = p["preflight"] or {}
                lines.append(
                    f"    {n:<{width}}  SM{p['sm']}  preflight compile for "
                    f"SM{pre.get('sm')} passed; on the device run: "
                    f"{p['finish_on_device']}  (or sh {p['device_command']})"
                )
        if not d["profiles"]:
            lines.append("  no engines (dsc compile ARTIFACT --profile P builds one)")
        v = d.get("validation")
        if v:
            if v.get("kind") == "smoke":
                if v.get("status") == "skipped":
                    lines.append(f"  validation: smoke check skipped ({v.get('reason')})")
                else:
                    verdict = "passed" if v.get("passed") else "FAILED"
                    n = len(v.get("generated_tokens", []))
                    lines.append(
                        f"  validation: smoke check {verdict} (ONNX Runtime: finite "
                        f"logits, {n} greedy tokens, KV cache = prefill to "
                        f"{v.get('kv_rel_diff', 0):.1e}); accuracy gate: "
                        f"dsc validate {d['artifact']}"
                    )
                    if v.get("text"):
                        lines.append(f"    greedy text: {' '.join(v['text'].split())!r}")
            else:
                lines.append(
                    f"  validation: {v.get('kind')} {'passed' if v.get('passed') else 'FAILED'}"
                )
        f = d["files"]
        lines.append("  " + "  ".join(f"{k}: {v}" for k, v in f.items()))
        return "\n".join(lines)
