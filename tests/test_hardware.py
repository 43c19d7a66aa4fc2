"""Hardware profiles: built-in figures, strict loading, cross-field rules, overrides, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dsc.cli import cli, main
from dsc.errors import EXIT_BAD_INPUT, BadInput
from dsc.hardware import (
    HardwareProfile,
    aliases,
    list_profiles,
    load_profile,
    parse_overrides,
    profile_names,
)
from dsc.precision import RTX_TARGET_SMS
from dsc.profiles import PROFILES_DIR

FACTS = Path(__file__).resolve().parents[2] / "shared" / "hardware-facts.md"

ISSUE_TARGETS = {
    "a100-40gb",
    "a100-80gb",
    "h100-sxm",
    "h100-pcie",
    "h200",
    "l4",
    "l40s",
    "t4",
    "rtx-4090",
    "rtx-a6000",
    "jetson-agx-orin-64gb",
    "jetson-agx-orin-32gb",
    "jetson-orin-nx-16gb",
    "jetson-orin-nx-8gb",
    "jetson-orin-nano-8gb",
    "jetson-orin-nano-4gb",
}
SUPER = {
    "jetson-orin-nx-16gb",
    "jetson-orin-nx-8gb",
    "jetson-orin-nano-8gb",
    "jetson-orin-nano-4gb",
}


def _raw(name: str) -> dict:
    return yaml.safe_load((Path(PROFILES_DIR) / f"{name}.yaml").read_text())


def _write(tmp_path: Path, data: dict, name: str = "mine.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# --- the built-in profiles ----------------------------------------------------------------------


def test_every_issue_target_and_super_mode_has_a_profile():
    names = set(profile_names())
    assert names >= ISSUE_TARGETS
    assert {f"{n}-super" for n in SUPER} <= names
    assert len(names) == 20


def test_each_file_is_named_after_its_profile_and_loads():
    for prof in list_profiles():
        assert Path(prof.path).stem == prof.name
        assert isinstance(prof, HardwareProfile)
        assert prof.sources, prof.name


def test_aliases_resolve_case_insensitively():
    assert aliases() == {
        "a100": "a100-80gb",
        "h100": "h100-sxm",
        "jetson-orin": "jetson-agx-orin-64gb",
    }
    assert load_profile("A100").name == "a100-80gb"
    assert load_profile("h100").name == "h100-sxm"
    assert load_profile("Jetson-Orin").name == "jetson-agx-orin-64gb"


def test_compute_capability_and_sm():
    sms = {p.name: p.sm for p in list_profiles()}
    assert sms["h100-sxm"] == sms["h200"] == 90
    assert sms["a100-40gb"] == 80 and sms["t4"] == 75 and sms["rtx-a6000"] == 86
    assert sms["l4"] == sms["l40s"] == sms["rtx-4090"] == 89
    assert {v for k, v in sms.items() if k.startswith("jetson")} == {87}


def test_precision_rules_hold_for_every_builtin():
    for p in list_profiles():
        assert "fp16" in p.precisions
        if "fp8" in p.precisions:
            assert p.sm >= 89, p.name
        if "bf16" in p.precisions or "int4" in p.precisions:
            assert p.sm >= 80, p.name
    assert load_profile("t4").precisions == ("fp16", "int8")
    assert "fp8" not in load_profile("jetson-orin-nano-8gb-super").precisions
    assert "fp8" in load_profile("h100-pcie").precisions


def test_figures_match_hardware_facts():
    # Dense = the datasheet's sparse figure halved (hardware-facts §1b): H100 SXM 1,979 / 3,958.
    h100 = load_profile("h100-sxm")
    assert h100.throughput_tflops.fp16 == pytest.approx(1979 / 2, abs=0.5)
    assert h100.throughput_tflops.fp8 == 3958 / 2
    assert h100.memory.bandwidth_gbps == 3350 and h100.memory.gb == 80
    assert load_profile("h200").throughput_tflops == h100.throughput_tflops
    assert load_profile("h200").memory.gb == 141
    # Orin Nano 8GB: 40 -> 67 sparse module TOPS, 68 -> 102 GB/s with Super (§2e).
    base, sup = load_profile("jetson-orin-nano-8gb"), load_profile("jetson-orin-nano-8gb-super")
    assert (base.memory.bandwidth_gbps, sup.memory.bandwidth_gbps) == (68, 102)
    assert base.throughput_tflops.int8 == 40 / 2 and sup.throughput_tflops.int8 == 67 / 2
    # Orin NX: Super raises compute, not bandwidth (already 3200 MHz): 128 bit x 3200 MHz x 2.
    nx, nx_s = load_profile("jetson-orin-nx-16gb"), load_profile("jetson-orin-nx-16gb-super")
    assert nx.memory.bandwidth_gbps == nx_s.memory.bandwidth_gbps == 128 / 8 * 3200 * 2 / 1000
    assert nx.throughput_tflops.int8 == 30 and nx_s.throughput_tflops.int8 == 38.5
    # FP16 = INT8 / 2 on Ampere tensor cores (§2b).
    for p in list_profiles():
        if p.is_jetson:
            assert p.throughput_tflops.fp16 == pytest.approx(p.throughput_tflops.int8 / 2, 0.01)
    dla = {p.name: p.dla_cores for p in list_profiles() if p.is_jetson}
    assert dla["jetson-agx-orin-64gb"] == 2 and dla["jetson-orin-nx-8gb"] == 1
    assert dla["jetson-orin-nano-8gb"] == 0


def test_super_profiles_pair_with_their_base():
    for name in SUPER:
        base, sup = load_profile(name), load_profile(f"{name}-super")
        assert sup.memory.gb == base.memory.gb and sup.power_mode == "MAXN_SUPER"
        assert sup.memory.bandwidth_gbps >= base.memory.bandwidth_gbps
        assert sup.throughput_tflops.int8 > base.throughput_tflops.int8


def test_jetson_memory_is_shared_and_reserved():
    for p in list_profiles():
        assert p.memory.shared_with_cpu == p.is_jetson
        assert (p.memory.os_reserved_gb > 0) == p.is_jetson
        assert (p.tensorrt.jetpack is not None) == p.is_jetson


def test_rtx_targets_and_preflight():
    for p in list_profiles():
        assert p.preflight_sm in RTX_TARGET_SMS
        if p.sm in RTX_TARGET_SMS:
            assert p.rtx_target_sm == p.sm == p.preflight_sm, p.name
        else:
            assert p.rtx_target_sm is None, p.name
    assert load_profile("h100").preflight_sm == 89  # the FP8-capable RTX target
    assert load_profile("jetson-orin").preflight_sm == 80


@pytest.mark.skipif(not FACTS.is_file(), reason="shared/hardware-facts.md not beside the repo")
def test_source_ids_exist_in_hardware_facts():
    facts = FACTS.read_text()
    for p in list_profiles():
        for src in p.sources:
            m = re.match(r"(S\d+) ", src)
            if m:
                assert f"- {m.group(1)} " in facts, (p.name, src)


def test_unconfirmed_figures_are_marked():
    text = (Path(PROFILES_DIR) / "l40s.yaml").read_text()
    assert "int8: 733  # unconfirmed" in text
    assert any("unconfirmed" in n for n in load_profile("rtx-4090").notes)


# --- strict loading -----------------------------------------------------------------------------


def test_unknown_key_names_key_and_file(tmp_path):
    data = _raw("l4")
    data["memory"]["bandwith_gbps"] = 300
    path = _write(tmp_path, data)
    with pytest.raises(BadInput) as e:
        load_profile(path)
    msg = str(e.value)
    assert "'memory.bandwith_gbps'" in msg and str(path) in msg
    assert "did you mean 'memory.bandwidth_gbps'" in msg


def test_unknown_top_level_key(tmp_path):
    data = {**_raw("t4"), "vram": 16}
    path = _write(tmp_path, data)
    with pytest.raises(BadInput, match=r"unknown key 'vram' in .*mine\.yaml"):
        load_profile(str(path))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (("memory", "gb"), "sixteen", "expected a number, got str 'sixteen'"),
        (("envelope", "max_batch"), True, "expected an integer, got bool True"),
        (("envelope", "max_batch"), 2.5, "expected an integer, got float 2.5"),
        (("memory", "shared_with_cpu"), "yes", "expected true or false"),
        (("precisions",), "fp16", "expected a list of strings"),
        (("kind",), "laptop", "expected one of datacenter, workstation, jetson"),
        (("compute_capability",), 8.9, "expected a string"),
    ],
)
def test_wrong_type_names_key_and_file(tmp_path, key, value, expected):
    data = _raw("l4")
    target = data
    for k in key[:-1]:
        target = target[k]
    target[key[-1]] = value
    path = _write(tmp_path, data)
    with pytest.raises(BadInput) as e:
        load_profile(path)
    msg = str(e.value)
    assert msg.startswith(".".join(key) + f" in {path}")
    assert expected in msg


def test_missing_key(tmp_path):
    data = _raw("l4")
    del data["builder"]["workspace_gb"]
    with pytest.raises(BadInput, match=r"missing key 'builder.workspace_gb' in .*mine\.yaml"):
        load_profile(_write(tmp_path, data))


def test_fp8_needs_sm89(tmp_path):
    data = _raw("jetson-orin-nano-8gb")
    data["precisions"] = ["fp16", "int8", "fp8"]
    data["throughput_tflops"]["fp8"] = 20.0
    with pytest.raises(
        BadInput,
        match=r"precision fp8 needs SM >= 89, but compute_capability "
        r"8.7 is SM87",
    ):
        load_profile(_write(tmp_path, data))
    # The same list is legal on an SM89 part.
    data = _raw("l4")
    data["precisions"] = ["fp16", "int8", "fp8"]
    assert load_profile(_write(tmp_path, data)).precisions == ("fp16", "int8", "fp8")


def test_bf16_and_int4_need_sm80():
    with pytest.raises(BadInput, match="precision bf16 needs SM >= 80"):
        load_profile("t4", ["precisions=[fp16, bf16]", "throughput_tflops.bf16=65"])
    with pytest.raises(BadInput, match="precision int4 needs SM >= 80"):
        load_profile("t4", ["precisions=[fp16, int4]"])


def test_listed_precision_needs_a_peak():
    with pytest.raises(BadInput, match=r"precision int8 is listed but throughput_tflops.int8"):
        load_profile("l4", ["throughput_tflops.int8=null"])


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("h100", ["rtx_target_sm=90"], "TensorRT-RTX compiles only for SM75/80/86/89/120"),
        ("h100", ["preflight_sm=90"], "preflight_sm 90 is not an SM TensorRT-RTX compiles for"),
        ("l4", ["preflight_sm=80"], "preflight_sm must equal rtx_target_sm"),
        (
            "l4",
            ["rtx_target_sm=86", "preflight_sm=86"],
            "rtx_target_sm 86 differs from the GPU's SM89",
        ),
        ("l4", ["dla_cores=2"], "dla_cores > 0 needs kind: jetson"),
        ("l4", ["memory.shared_with_cpu=true"], "only true on Jetson"),
        ("jetson-orin", ["tensorrt.jetpack=null"], "tensorrt.jetpack is set exactly when"),
        ("jetson-orin", ["memory.os_reserved_gb=64"], "leaves nothing of memory.gb"),
        ("l4", ["envelope.max_input_len=99999"], "exceeds envelope.max_kv"),
        ("l4", ["builder.optimization_level=7"], "must be 0..5"),
        ("l4", ["schema_version=2"], "schema_version 2 is not supported"),
        ("l4", ["compute_capability=nine"], "must look like"),
        ("l4", ["precisions=[fp16, fp16]"], "listed twice"),
        ("l4", ["precisions=[int8]"], "must include fp16"),
        ("l4", ["precisions=[fp16, fp4]"], "unknown fp4"),
    ],
)
def test_cross_field_rules(name, overrides, match):
    with pytest.raises(BadInput, match=match):
        load_profile(name, overrides)


def test_ampere_plus_needs_ampere():
    with pytest.raises(BadInput, match="ampere_plus needs an Ampere or newer GPU"):
        load_profile("t4", ["builder.hardware_compatibility=ampere_plus"])
    assert (
        load_profile(
            "a100", ["builder.hardware_compatibility=ampere_plus"]
        ).builder.hardware_compatibility
        == "ampere_plus"
    )


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(BadInput, match=r"bad\.yaml: not valid YAML"):
        load_profile(bad)
    with pytest.raises(BadInput, match="does not exist"):
        load_profile(tmp_path / "absent.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(BadInput, match="expected a mapping"):
        load_profile(listy)


def test_unknown_name_suggests_closest():
    with pytest.raises(BadInput, match=r"unknown profile 'h10'; did you mean 'h100'"):
        load_profile("h10")
    with pytest.raises(BadInput, match=r"did you mean 'jetson-orin-nano-8gb-super'"):
        load_profile("jetson-orin-nano-8gb-supr")
    with pytest.raises(BadInput) as e:
        load_profile("zzzzzz")
    assert "did you mean" not in str(e.value)


def test_user_profile_by_path_roundtrips(tmp_path):
    orig = load_profile("jetson-orin-nx-8gb-super")
    data = orig.to_dict()
    data["name"] = "my-board"
    data["aliases"] = []
    mine = load_profile(_write(tmp_path, data))
    assert mine.name == "my-board" and mine.path == str(tmp_path / "mine.yaml")
    assert mine.memory == orig.memory and mine.throughput_tflops == orig.throughput_tflops


# --- overrides ----------------------------------------------------------------------------------


def test_set_overrides_one_field_and_keeps_the_rest():
    base = load_profile("jetson-orin-nano-8gb")
    p = load_profile("jetson-orin-nano-8gb", ["builder.workspace_gb=8", "envelope.max_batch=4"])
    assert p.builder.workspace_gb == 8.0 and isinstance(p.builder.workspace_gb, float)
    assert p.envelope.max_batch == 4 and p.envelope.max_kv == base.envelope.max_kv
    assert p.memory == base.memory
    assert p.overrides == ("builder.workspace_gb=8", "envelope.max_batch=4")
    assert load_profile("l4", {"memory.bandwidth_gbps": 250}).memory.bandwidth_gbps == 250.0


def test_set_values_are_yaml_scalars_and_type_checked():
    assert parse_overrides(["a.b=8", "c=[fp16, int8]", "d=null", "e=true", "f=2.5"]) == {
        "a.b": 8,
        "c": ["fp16", "int8"],
        "d": None,
        "e": True,
        "f": 2.5,
    }
    with pytest.raises(
        BadInput,
        match=r"envelope.max_batch in --set: expected an integer, "
        r"got float 2.5",
    ):
        load_profile("l4", ["envelope.max_batch=2.5"])
    with pytest.raises(BadInput, match=r"unknown key 'memory.size' in --set"):
        load_profile("l4", ["memory.size=3"])
    with pytest.raises(BadInput, match="expected key=value"):
        load_profile("l4", ["memory.gb"])
    with pytest.raises(BadInput, match="is a group"):
        load_profile("l4", ["builder=3"])


def test_set_power_mode_field_exists():
    assert load_profile("jetson-orin-nx-16gb", ["power_mode=25W"]).power_mode == "25W"


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_profiles_list():
    result = CliRunner().invoke(cli, ["profiles", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 + 20
    assert lines[0].split()[:3] == ["name", "kind", "SM"]
    row = next(ln for ln in lines if ln.startswith("jetson-agx-orin-64gb "))
    assert "64 shared" in row and "204.8" in row and row.rstrip().endswith("jetson-orin")
    data = json.loads(CliRunner().invoke(cli, ["profiles", "list", "--json"]).output)
    assert [d["name"] for d in data] == profile_names()


def test_cli_profiles_show_alias_and_set():
    result = CliRunner().invoke(
        cli, ["profiles", "show", "jetson-orin", "--set", "builder.workspace_gb=2"]
    )
    assert result.exit_code == 0, result.output
    assert "with --set builder.workspace_gb=2" in result.output
    shown = yaml.safe_load(result.output)
    assert shown["name"] == "jetson-agx-orin-64gb" and shown["builder"]["workspace_gb"] == 2.0
    data = json.loads(CliRunner().invoke(cli, ["profiles", "show", "h200", "--json"]).output)
    assert data["sm"] == 90 and data["rtx_target_sm"] is None and data["preflight_sm"] == 89


def test_cli_unknown_profile_is_one_line_exit_3(capsys):
    result = CliRunner().invoke(cli, ["profiles", "show", "h10"])
    assert isinstance(result.exception, BadInput)
    with pytest.raises(SystemExit) as e:
        main(["profiles", "show", "h10"])
    assert e.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'h100'" in err and "Traceback" not in err
