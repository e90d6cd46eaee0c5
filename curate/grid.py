"""The prompt grid: 5 subfields x 3 difficulty levels x 4 task types = 60 Jinja2 templates that turn a caption into
a teacher request.

    curate/prompts/<subfield>/<level>/<task>.j2     one cell: what its subfield looks at, what its level asks for
    curate/prompts/tasks/<task>.j2                  a task's instructions and output contract
    curate/prompts/tasks/_frame.j2                  what every request shares

A cell's id is `<subfield>/<level>/<task>`.  A folder of overrides laid out the same way replaces any file in it: a
cell, a task base or the frame.  Templates render in Jinja2's sandbox with undefined names as errors, so a typo in
an override fails on the first render with the template's name, not in the middle of a run.

The output contract (what the filters parse, `curate/teacher_output.py`):

    <question>...</question> [<options>A. ... B. ...</options>] <think>...</think> <answer>...</answer>

once, or once per turn for a multi-turn conversation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from patho_r1.curate.config import GRID_SUBFIELDS
from patho_r1.curate.config import LEVELS as GRID_LEVELS

TASKS = ("mcq", "description", "reasoning", "conversation")
BUILTIN = Path(__file__).parent / "prompts"


def cell_id(subfield: str, level: str, task: str) -> str:
    return f"{subfield}/{level}/{task}"


@dataclass(frozen=True)
class PromptGrid:
    overrides: Path | None = None

    def __post_init__(self):
        from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined
        from jinja2.sandbox import SandboxedEnvironment

        if self.overrides is not None and not Path(self.overrides).is_dir():
            raise FileNotFoundError(f"prompt overrides: not a folder: {self.overrides}")
        loaders = ([FileSystemLoader(str(self.overrides))] if self.overrides else []) + [FileSystemLoader(str(BUILTIN))]
        env = SandboxedEnvironment(loader=ChoiceLoader(loaders), undefined=StrictUndefined, autoescape=False,
                                   keep_trailing_newline=False, trim_blocks=False)
        object.__setattr__(self, "_env", env)

    def cells(self) -> list[str]:
        return [cell_id(s, lv, t) for s in GRID_SUBFIELDS for lv in GRID_LEVELS for t in TASKS]

    def source_of(self, cell: str) -> Path:
        """The file a cell renders from: the override where there is one."""
        if self.overrides and (Path(self.overrides) / f"{cell}.j2").is_file():
            return Path(self.overrides) / f"{cell}.j2"
        return BUILTIN / f"{cell}.j2"

    def overridden(self) -> list[str]:
        """Every template file (cell, task base or frame) the override folder replaces."""
        if not self.overrides:
            return []
        return sorted(str(p.relative_to(self.overrides).with_suffix("")) for p in Path(self.overrides).rglob("*.j2"))

    def digest(self) -> str:
        """One digest of every template in use: a changed prompt changes the generate stage's config hash."""
        h = hashlib.sha256()
        names = sorted({str(p.relative_to(BUILTIN)) for p in BUILTIN.rglob("*.j2")}
                       | {f"{o}.j2" for o in self.overridden()})
        for name in names:
            path = Path(self.overrides) / name if self.overrides and (Path(self.overrides) / name).is_file() \
                else BUILTIN / name
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()[:16]

    def render(self, cell: str, *, caption: str, references: list[str] | None = None, with_image: bool = False,
               n_options: int = 4, n_turns: int = 3) -> str:
        subfield, level, task = cell.split("/")
        template = self._env.get_template(f"{cell}.j2")
        text = template.render(caption=caption, references=references or [], with_image=with_image,
                               subfield=subfield, level=level, task=task, n_options=n_options, n_turns=n_turns)
        return "\n".join(line.rstrip() for line in text.strip().splitlines())

    def check(self) -> list[str]:
        """Render every cell with a sample caption; returns one line per broken cell (empty: all good)."""
        problems = []
        for cell in self.cells():
            try:
                text = self.render(cell, caption="Sample caption.", references=["A reference."])
            except Exception as exc:  # a Jinja2 syntax or undefined-name error, named by its cell
                problems.append(f"{cell} ({self.source_of(cell)}): {type(exc).__name__}: {exc}")
                continue
            if "Sample caption." not in text:
                problems.append(f"{cell} ({self.source_of(cell)}): the caption does not appear in the request")
        return problems
