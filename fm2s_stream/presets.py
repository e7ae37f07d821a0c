"""FM2S noise-injection parameters: the paper's presets and its noise-level tables.

All constants are defined on the paper's domain: intensities in [0, 1] where 1.0 is the white level
of an 8-bit frame (see `fm2s_stream.scaling` for how 16-bit frames are mapped into it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["MAX_RHO", "NOISE_LEVELS", "PRESETS", "Preset", "get_preset", "preset_names"]


MAX_RHO = 0.7  # the largest lag-1 correlation a 3-tap [c, 1, c] filter gives (c = 1 / sqrt(2): 0.707)


@dataclass(frozen=True)
class Preset:
    """One complete set of FM2S hyper-parameters for a microscope modality and noise level.

    n_chan: channels the grey frame is replicated into; stride: tile size of the adaptive noise map;
    w_size: median window of the paper's pre-denoised target; k_g, k_p: Gaussian and Poisson map
    strengths; lambda_p: global Poisson level (larger = weaker); rho: lag-1 correlation of the
    injected noise along each axis (0: white, the paper's; calibrated from frames with correlated noise).
    """

    name: str
    n_chan: int
    stride: int
    w_size: int
    k_g: float
    k_p: float
    lambda_p: float
    rho: float = 0.0

    def __post_init__(self) -> None:
        if self.n_chan < 1 or self.stride < 1 or self.w_size < 1:
            raise ValueError(f"preset {self.name!r}: n_chan, stride and w_size must be >= 1")
        if self.k_g < 0 or self.k_p <= 0 or self.lambda_p <= 0:
            raise ValueError(f"preset {self.name!r}: need k_g >= 0, k_p > 0, lambda_p > 0")
        if not 0.0 <= self.rho <= MAX_RHO:
            raise ValueError(f"preset {self.name!r}: rho must be in [0, {MAX_RHO}], got {self.rho}")

    def with_noise(self, k_g: float, k_p: float, lambda_p: float, name: str | None = None,
                   rho: float | None = None) -> Preset:
        """Return a copy with other noise strengths (e.g. from calibration); rho None keeps this one's."""
        return replace(self, k_g=k_g, k_p=k_p, lambda_p=lambda_p, name=name or self.name,
                       rho=self.rho if rho is None else rho)

    def record(self) -> dict[str, object]:
        """The preset as JSON-ready fields (state files)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: object) -> Preset:
        """A preset from `record()`'s fields; ValueError if they are missing or out of range."""
        if not isinstance(record, dict):
            raise ValueError("preset record is not an object")
        try:
            return cls(str(record["name"]), int(record["n_chan"]), int(record["stride"]), int(record["w_size"]),
                       float(record["k_g"]), float(record["k_p"]), float(record["lambda_p"]),
                       float(record.get("rho", 0.0)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"preset record lacks a field or has a wrong type ({exc})") from exc


PRESETS: dict[str, Preset] = {
    "confocal": Preset("confocal", n_chan=2, stride=75, w_size=3, k_g=200, k_p=30, lambda_p=70),
    "twophoton": Preset("twophoton", n_chan=2, stride=75, w_size=3, k_g=175, k_p=30, lambda_p=60),
    "widefield": Preset("widefield", n_chan=1, stride=75, w_size=11, k_g=220, k_p=45, lambda_p=2000),
    "srdtrans": Preset("srdtrans", n_chan=6, stride=5, w_size=3, k_g=60, k_p=40, lambda_p=125),
}

# (k_g, k_p, lambda_p) for inputs averaged over N raw exposures (the paper's avg2..avg16 columns).
NOISE_LEVELS: dict[str, dict[int, tuple[float, float, float]]] = {
    "confocal": {2: (125, 95, 285), 4: (70, 195, 485), 8: (10, 240, 650), 16: (5, 650, 1400)},
    "twophoton": {2: (150, 85, 300), 4: (90, 300, 480), 8: (20, 185, 600), 16: (15, 850, 3800)},
    "widefield": {2: (220, 100, 2500), 4: (60, 650, 3500), 8: (20, 600, 4000), 16: (1, 1500, 4800)},
}


def preset_names() -> list[str]:
    """Names accepted by `get_preset`, e.g. for CLI choices."""
    return sorted(PRESETS)


def get_preset(name: str, averaged: int = 1) -> Preset:
    """The paper preset `name` for raw frames, or for the mean of `averaged` exposures (2, 4, 8, 16)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}") from None
    if averaged == 1:
        return base
    levels = NOISE_LEVELS.get(name, {})
    if averaged not in levels:
        raise ValueError(f"preset {name!r} has no table for {averaged} averaged frames: {sorted(levels)}")
    return base.with_noise(*levels[averaged], name=f"{name}-avg{averaged}")
