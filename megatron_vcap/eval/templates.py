"""Judge and generation prompt templates, loaded from files.

Our defaults live in ``megatron_vcap/eval/templates/*.txt`` (written for this project after the
protocols in EVAL_PROTOCOLS.md); ``--templates DIR`` substitutes any of them by file name, e.g. a
user's copy of a benchmark's official text. A template file is the user message, optionally
preceded by a system message: sections start with a line ``[system]`` or ``[user]``.
Placeholders are ``{{name}}``; a template that lacks one its task fills in is an error.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

from megatron_vcap.config.loader import ConfigError

# Template name -> the placeholders its task fills in.
TEMPLATES = {
    "autodq_extract_events": ("description", "max_items"),
    "autodq_entail_events": ("description", "items"),
    "autodq_extract_objects": ("description", "max_items"),
    "autodq_entail_objects": ("description", "items"),
    "vdc_answer": ("caption", "question"),
    "vdc_judge": ("question", "answer", "prediction"),
    "carebench_instruction": (),
}
_SECTION = re.compile(r"^\[(system|user)\]\s*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class Template:
    def __init__(self, name: str, text: str, source: str):
        self.name, self.source = name, source
        parts = _SECTION.split(text)
        if len(parts) == 1:
            self.system, self.user = None, text.strip()
        else:
            sections = dict(zip(parts[1::2], (p.strip() for p in parts[2::2])))
            self.system, self.user = sections.get("system"), sections.get("user", "")
        if not self.user:
            raise ConfigError(f"template {source}: empty user message")
        used = set(_PLACEHOLDER.findall(f"{self.system or ''}\n{self.user}"))
        wanted = set(TEMPLATES[name])
        missing, unknown = wanted - used, used - wanted
        # max_items is a hint the official texts hard-code; every other placeholder is needed.
        missing.discard("max_items")
        if missing or unknown:
            expected = ", ".join("{{" + p + "}}" for p in TEMPLATES[name]) or "none"
            raise ConfigError(
                f"template {source}: placeholders missing {sorted(missing)}, unknown "
                f"{sorted(unknown)} (expected: {expected})"
            )

    def render(self, **values) -> tuple[dict[str, str], ...]:
        """Chat messages with the placeholders filled in (values inserted verbatim, once)."""

        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)

        msgs = [] if self.system is None else [{"role": "system", "content": fill(self.system)}]
        msgs.append({"role": "user", "content": fill(self.user)})
        return tuple(msgs)

    def text(self) -> str:
        """The plain user text (for generation instructions, which have no placeholders)."""
        return self.user


def load_templates(override_dir: str | os.PathLike | None = None) -> dict[str, Template]:
    """Every template: ``override_dir/<name>.txt`` where present, else the packaged default."""
    base = resources.files("megatron_vcap.eval") / "templates"
    override = Path(override_dir) if override_dir else None
    if override is not None and not override.is_dir():
        raise ConfigError(f"--templates {override}: not a directory")
    if override is not None:
        known = {f"{n}.txt" for n in TEMPLATES}
        strays = sorted(p.name for p in override.glob("*.txt") if p.name not in known)
        if strays:
            raise ConfigError(
                f"--templates {override}: unknown template file(s) {strays}; known: {sorted(known)}"
            )
    out = {}
    for name in TEMPLATES:
        path = override / f"{name}.txt" if override is not None else None
        if path is not None and path.is_file():
            out[name] = Template(name, path.read_text(encoding="utf-8"), str(path))
        else:
            text = (base / f"{name}.txt").read_text(encoding="utf-8")
            out[name] = Template(name, text, f"default:{name}.txt")
    return out
