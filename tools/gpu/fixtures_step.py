"""Kit helper ``fixtures``: make sure the carried fixtures are there (write them if not)."""

from __future__ import annotations

from tools.gpu.common import SectionContext, SectionResult
from tools.gpu.fixtures import ensure_fixtures, folder_bytes


def run(ctx: SectionContext) -> SectionResult:
    res = SectionResult()
    existed = (ctx.fixtures / "fixtures.json").is_file()
    paths = ensure_fixtures(ctx.fixtures)
    res.figures.update(carried=existed, path=str(paths["root"]), bytes=folder_bytes(paths["root"]))
    res.check("fixtures present", paths["manifest"].is_file() and paths["model"].is_dir())
    return res
