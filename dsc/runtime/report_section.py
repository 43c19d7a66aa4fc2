"""The report's section for `dsc bench --engine` records (bench-engine-<profile>.json)."""

from __future__ import annotations

from dsc.validate._report_view import Section, Table


def _pct(x) -> str:
    return "—" if x is None else f"{x:.1%}"


def engine_bench_sections(benches: list[dict]) -> list[Section]:
    """One section per engine bench: a row per (CUDA graphs, batch, prompt length)."""
    out = []
    for b in benches:
        s = Section(
            f"engine-latency-{b.get('profile')}",
            f"Engine latency: {b.get('profile')} ({b.get('runtime')})",
        )
        if b.get("note"):
            s.text.append(str(b["note"]))
        rows = []
        for run in b.get("runs") or []:
            for r in run.get("rows") or []:
                rows.append(
                    [
                        "on" if run.get("cuda_graphs") else "off",
                        str(r["batch"]),
                        str(r["prompt_len"]),
                        *(f"{r['ttft'][k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms")),
                        *(f"{r['tpot'][k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms")),
                        f"{r['decode_tokens_per_s']:,.1f}",
                        "—"
                        if r.get("decode_ceiling_tokens_per_s") is None
                        else f"{r['decode_ceiling_tokens_per_s']:,.0f}",
                        _pct(r.get("fraction_of_roofline")),
                    ]
                )
        s.tables.append(
            Table(
                [
                    "CUDA graphs",
                    "batch",
                    "prompt",
                    "TTFT p50 ms",
                    "TTFT p90 ms",
                    "TTFT p99 ms",
                    "TPOT p50 ms",
                    "TPOT p90 ms",
                    "TPOT p99 ms",
                    "decode tok/s",
                    "roofline tok/s",
                    "of roofline",
                ],
                rows,
                align="l" + "r" * 11,
            )
        )
        s.notes.append(
            "roofline: dsc plan's decode ceiling for this profile's bandwidth, "
            "model, precision, batch and context (prompt + generated tokens)"
        )
        out.append(s)
    return out
