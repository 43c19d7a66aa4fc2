"""Which TensorRT: the standard `tensorrt` package or `tensorrt_rtx`, imported on demand.

Both packages expose the same Python API (`Builder`, `OnnxParser`, `IBuilderConfig`, ...) under
different module names, so the builder works on whichever module `load_trt` returns. The few
places where the two differ are methods of `TrtFlavourApi`, and nowhere else:

- target architecture: TensorRT-RTX compiles ahead of time for a chosen compute capability
  (`config.num_compute_capabilities`, `config.set_compute_capability(ComputeCapability.SM80, 0)`)
  without a GPU; standard TensorRT builds for the GPU it runs on.
- timing cache: a no-op in TensorRT-RTX (deprecated in 1.2; older releases needed a GPU for it).
- hardware/version compatibility and DLA: standard TensorRT only.

Nothing here imports either package at module import time.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import logging
from types import ModuleType

from dsc.errors import Unsupported
from dsc.precision import RTX_TARGET_SMS

logger = logging.getLogger(__name__)


class Flavour(str, enum.Enum):  # noqa: UP042  (str() of a member stays "Flavour.X")
    """A TensorRT distribution; the value is its Python module name."""

    TENSORRT = "tensorrt"
    RTX = "tensorrt_rtx"

    @property
    def label(self) -> str:
        return "TensorRT" if self is Flavour.TENSORRT else "TensorRT-RTX"

    @classmethod
    def parse(cls, value: Flavour | str) -> Flavour:
        if isinstance(value, Flavour):
            return value
        key = str(value).strip().lower().replace("-", "_")
        aliases = {
            "tensorrt": cls.TENSORRT,
            "trt": cls.TENSORRT,
            "standard": cls.TENSORRT,
            "tensorrt_rtx": cls.RTX,
            "rtx": cls.RTX,
            "trt_rtx": cls.RTX,
        }
        if key not in aliases:
            raise Unsupported(
                f"unknown TensorRT backend {value!r} (expected tensorrt or tensorrt_rtx)"
            )
        return aliases[key]


# The order `load_trt()` tries when no preference is given: on the target GPU or Jetson the
# standard package builds for the device itself; TensorRT-RTX is the CPU-only AOT fallback.
DEFAULT_ORDER = (Flavour.TENSORRT, Flavour.RTX)


_INSTALL_HINT = {
    Flavour.TENSORRT: "standard TensorRT is not installed (it comes with JetPack on a Jetson, or "
    "from NVIDIA's package index on an x86 GPU machine)",
    Flavour.RTX: "TensorRT-RTX is not installed (pip install 'dsc[rtx]', i.e. tensorrt-rtx-cu13)",
}


def available_backends() -> list[Flavour]:
    """The flavours whose module can be found, in `DEFAULT_ORDER`; imports nothing."""
    found = []
    for flavour in DEFAULT_ORDER:
        try:
            spec = importlib.util.find_spec(flavour.value)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            found.append(flavour)
    return found


def load_trt(prefer: Flavour | str | None = None) -> tuple[ModuleType, Flavour]:
    """Import and return (module, flavour).

    With `prefer`, only that flavour is tried, so a build never silently switches between
    compiling for the local GPU and compiling ahead of time. Without it, `DEFAULT_ORDER`.
    """
    order = [Flavour.parse(prefer)] if prefer is not None else list(DEFAULT_ORDER)
    reasons = []
    for flavour in order:
        try:
            module = importlib.import_module(flavour.value)
        except ImportError as e:
            reasons.append(f"{_INSTALL_HINT[flavour]} ({e})")
            continue
        except Exception as e:  # a broken install (missing CUDA libs, stub wheel) raises anything
            reasons.append(f"{flavour.value} failed to import: {type(e).__name__}: {e}")
            continue
        if not hasattr(module, "Builder") or not hasattr(module, "OnnxParser"):
            # The PyPI `tensorrt` stub wheel installs a package without the real bindings.
            reasons.append(f"{flavour.value} is installed without its bindings (stub package?)")
            continue
        logger.debug("using %s %s", flavour.label, getattr(module, "__version__", "?"))
        return module, flavour
    raise Unsupported("; ".join(reasons) if reasons else "no TensorRT backend available")


def trt_version(trt: ModuleType) -> str:
    return str(getattr(trt, "__version__", "unknown"))


class TrtFlavourApi:
    """Every difference between standard TensorRT and TensorRT-RTX the builder relies on."""

    def __init__(self, trt: ModuleType, flavour: Flavour):
        self.trt = trt
        self.flavour = flavour

    @property
    def is_rtx(self) -> bool:
        return self.flavour is Flavour.RTX

    def network_flags(self) -> int:
        # TensorRT 10.x needs STRONGLY_TYPED to build from the graph's own types; TensorRT 11 and
        # TensorRT-RTX 1.7 always build strongly typed and accept (ignore) the flag.
        member = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if member is None else 1 << int(member)

    def is_strongly_typed(self, network) -> bool:
        member = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return member is not None and bool(network.get_flag(member))

    def check_options(
        self,
        *,
        dla_core: int | None,
        hardware_compatibility: str | None,
        version_compatible: bool,
        target_sm: int | None,
    ) -> None:
        """Raise `Unsupported` for an option this flavour cannot honour (before any build)."""
        if not self.is_rtx:
            return
        if dla_core is not None:
            raise Unsupported(
                "DLA is a Jetson feature of standard TensorRT; TensorRT-RTX cannot build for it"
            )
        if hardware_compatibility not in (None, "none"):
            raise Unsupported(
                "hardware compatibility levels are a standard TensorRT option; "
                "TensorRT-RTX ignores them (choose a target SM instead)"
            )
        if version_compatible:
            raise Unsupported(
                "version-compatible engines are a standard TensorRT option; "
                "TensorRT-RTX has no lean runtime to embed"
            )
        if target_sm is not None and target_sm not in RTX_TARGET_SMS:
            names = ", ".join(f"SM{s}" for s in RTX_TARGET_SMS)
            raise Unsupported(
                f"TensorRT-RTX cannot compile ahead of time for SM{target_sm} "
                f"(it targets {names}); build that engine on the device with "
                f"standard TensorRT"
            )

    # -- target architecture -------------------------------------------------------------------

    def set_target(self, config, target_sm: int | None) -> list[str]:
        """Point the build at `target_sm`; returns notes for the build log."""
        if target_sm is None:
            if self.is_rtx:
                return [
                    "no target SM: TensorRT-RTX builds its default portable engine "
                    "(SM80, SM86, SM89, SM120; not Turing)"
                ]
            return []
        if self.is_rtx:
            member = getattr(self.trt.ComputeCapability, f"SM{target_sm}", None)
            if member is None:
                raise Unsupported(
                    f"TensorRT-RTX {trt_version(self.trt)} has no SM{target_sm} target"
                )
            config.num_compute_capabilities = 1
            if not config.set_compute_capability(member, 0):
                raise Unsupported(f"TensorRT-RTX refused target SM{target_sm}")
            return []
        # Standard TensorRT has no compute-capability setting: it compiles for the GPU present.
        return [
            f"standard TensorRT builds for the GPU it runs on; target SM{target_sm} is "
            f"recorded, not enforced"
        ]

    # -- timing cache -------------------------------------------------------------------------

    def supports_timing_cache(self) -> bool:
        return not self.is_rtx

    # -- portability and DLA (standard TensorRT only) -----------------------------------------

    def set_hardware_compatibility(self, config, level: str) -> None:
        names = {
            "none": "NONE",
            "ampere_plus": "AMPERE_PLUS",
            "same_compute_capability": "SAME_COMPUTE_CAPABILITY",
        }
        enum_ = getattr(self.trt, "HardwareCompatibilityLevel", None)
        member = getattr(enum_, names[level], None) if enum_ is not None else None
        if member is None:
            raise Unsupported(
                f"TensorRT {trt_version(self.trt)} has no hardware compatibility "
                f"level {level} (SAME_COMPUTE_CAPABILITY needs 10.9+)"
            )
        config.hardware_compatibility_level = member

    def set_version_compatible(self, config) -> None:
        config.set_flag(self.trt.BuilderFlag.VERSION_COMPATIBLE)

    def set_dla(self, builder, config, core: int, gpu_fallback: bool) -> None:
        cores = int(getattr(builder, "num_DLA_cores", 0))
        if core < 0 or core >= cores:
            raise Unsupported(f"DLA core {core} requested but this device has {cores} DLA cores")
        config.default_device_type = self.trt.DeviceType.DLA
        config.DLA_core = core
        if gpu_fallback:
            config.set_flag(self.trt.BuilderFlag.GPU_FALLBACK)
