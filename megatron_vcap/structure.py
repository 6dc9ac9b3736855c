"""The structured-thinking record shared by data (ground truth, SFT targets) and rewards (parser).

A video's structure is a list of subjects, each with a description, attributes and actions
(DESIGN.md §5). ``render_response`` writes the exact template the model is taught to produce;
the rewards parser reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Subject:
    description: str
    attributes: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "attributes": list(self.attributes),
            "actions": list(self.actions),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "subject") -> Subject:
        """Build from a manifest / judge mapping; ``where`` names the field in errors."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        desc = data.get("description")
        if not isinstance(desc, str) or not desc.strip():
            raise ValueError(f"{where}.description: expected a non-empty string")
        out = {}
        for key in ("attributes", "actions"):
            items = data.get(key, [])
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise ValueError(f"{where}.{key}: expected a list of strings")
            out[key] = [x.strip() for x in items if x.strip()]
        return cls(desc.strip(), out["attributes"], out["actions"])


def render_think(subjects: list[Subject]) -> str:
    lines = []
    for i, s in enumerate(subjects, 1):
        lines.append(f"Subject {i}: {s.description}")
        lines.append(f"Attributes: {'; '.join(s.attributes)}")
        lines.append(f"Actions: {'; '.join(s.actions)}")
    return "\n".join(lines)


def render_response(subjects: list[Subject], caption: str) -> str:
    """The full target response: ``<think>`` structure, then ``<answer>`` caption."""
    return f"<think>\n{render_think(subjects)}\n</think>\n<answer>\n{caption.strip()}\n</answer>"
