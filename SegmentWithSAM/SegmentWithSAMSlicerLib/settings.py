"""The one settings object of both front ends: what the user chooses (model, device, the model's intensity
window, live preview, where to click next, propagation direction, range and stop rules, and the backend: this
computer or a server).

The desktop module builds its parameter node from these fields (``SegmentWithSAM.py``, bound to the panel by
``connectGui`` through the widgets' ``SlicerParameterName``, which are these names); the web app binds each
field to the trame state key of the same name, but for the backend's (``backend``, ``server_address``,
``server_cafile``): where the web app's model runs is its operator's choice, never a page's. Each field's
``metadata`` holds its choices (a function, read when a front end is built; ``labels`` says what a panel shows
for a choice, where that is not the value itself) or its range, so the choices a panel offers are these and
nothing else.

A server's access key is no setting: the parameter node is saved in the scene file, which would keep it
(:mod:`.backend_choice` holds it, in memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from SegmentWithSAMLib.models import DEFAULT_MODEL, registry
from SegmentWithSAMLib.preprocessing import CT_PRESETS
from SegmentWithSAMLib.propagation import StopRules

DEVICES = ("auto", "cpu", "cuda", "mps")
DIRECTIONS = ("both", "up", "down")
BACKENDS = {"local": "this computer", "server": "a server"}  # where the model runs → what a panel shows


def model_choices() -> list[str]:
    """The models of the registry (``models/registry.json``), the default first."""
    return [DEFAULT_MODEL, *(name for name in registry() if name != DEFAULT_MODEL)]


def window_choices() -> list[str]:
    """The model's intensity window: the volume's display window, percentiles, or a CT preset."""
    return ["display", "auto", *CT_PRESETS]


def _choice(default: str, choices, labels: dict[str, str] | None = None) -> str:
    return field(default=default, metadata={"choices": choices, "labels": labels or {}})


def _within(default, low, high):
    return field(default=default, metadata={"range": (low, high)})


@dataclass
class Settings:
    """What the user chooses; see the module docstring. A stop rule at 0 is switched off; a range end at -1
    means "not set" (the accepted box's range, else the whole volume)."""

    model: str = _choice(DEFAULT_MODEL, model_choices)
    device: str = _choice("auto", lambda: list(DEVICES))
    model_window: str = _choice("display", window_choices)
    live_preview: bool = True
    auto_accept: bool = False  # write each 3D click's correction at once (else on Accept)
    suggest_next: bool = False  # after each step, mark where to click next
    direction: str = _choice("both", lambda: list(DIRECTIONS))
    range_start: int = _within(-1, -1, 4096)
    range_end: int = _within(-1, -1, 4096)
    min_similarity: float = _within(StopRules.min_similarity, 0.0, 1.0)
    min_score: float = _within(StopRules.min_score, 0.0, 1.0)
    max_area_ratio: float = _within(StopRules.max_area_ratio, 0.0, 20.0)
    min_overlap: float = _within(StopRules.min_overlap, 0.0, 1.0)
    max_empty: int = _within(StopRules.max_empty, 1, 20)
    skip: int = _within(0, 0, 4)
    backend: str = _choice("local", lambda: list(BACKENDS), BACKENDS)
    server_address: str = ""  # tcp://HOST:PORT or tls://HOST:PORT (backend "server")
    server_cafile: str = ""  # for a TLS server whose certificate this computer's CAs did not sign: that certificate


def stop_rules(settings) -> dict:
    """The propagation stop rules of ``settings`` (a :class:`Settings` or an object with its fields)."""
    return {"min_similarity": settings.min_similarity or None, "min_score": settings.min_score or None,
            "max_area_ratio": settings.max_area_ratio or None, "min_overlap": settings.min_overlap or None,
            "max_empty": settings.max_empty}


def runs_here(settings) -> bool:
    """Whether the model runs on this computer (its packages and checkpoint are needed here), not on a server."""
    return settings.backend != "server"


def choice_labels(name: str) -> list[str]:
    """What a panel shows for each choice of setting ``name``, in the order of its choices."""
    found = _field(name)
    return [found.metadata["labels"].get(choice, choice) for choice in found.metadata["choices"]()]


def device_of(settings) -> str | None:
    """The backend's device: None lets it choose (the GPU when there is one)."""
    return None if settings.device == "auto" else settings.device


def coerce(name: str, value):
    """``value`` (from a page or a widget) as the type of field ``name``, checked against its choices or range;
    ``ValueError`` naming the field otherwise."""
    found = _field(name)
    kind = {"str": str, "bool": bool, "int": int, "float": float}[found.type]
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"The setting {name} must be a {found.type}, not {value!r}.") from None
    if "choices" in found.metadata and value not in found.metadata["choices"]():
        raise ValueError(f"The setting {name} must be one of {', '.join(found.metadata['choices']())}, "
                         f"not {value!r}.")
    low, high = found.metadata.get("range", (value, value))
    if not low <= value <= high:
        raise ValueError(f"The setting {name} must be between {low} and {high}, not {value}.")
    return value


def _field(name: str):
    found = {f.name: f for f in fields(Settings)}.get(name)
    if found is None:
        raise ValueError(f"There is no setting {name!r}.")
    return found
