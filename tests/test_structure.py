"""The house: one `patho_r1` import root, imports that only point down, one phase table, one config base."""

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from patho_r1.config import PhaseConfig, PhaseResult, validate_config
from patho_r1.errors import ConfigError
from patho_r1.launch.phases import PHASES, PhaseType, get_phase, register_phase
from patho_r1.launch.recipe import build_plan

ROOT = Path(__file__).resolve().parent.parent

# Folder -> (package under patho_r1, floor).  A module may import its own package and lower floors; phases (floor 2)
# may not import each other; only the top floor imports the fixtures.
FOLDERS = {"rewards": ("patho_r1.rewards", 0), "patho": ("patho_r1", 1), "fixtures": ("patho_r1.fixtures", 1),
           "sft": ("patho_r1.sft", 2), "rl": ("patho_r1.rl", 2), "embed": ("patho_r1.embed", 2),
           "eval": ("patho_r1.eval", 2), "curate": ("patho_r1.curate", 2), "launch": ("patho_r1.launch", 3)}
PACKAGE_FLOOR = {pkg: floor for pkg, floor in FOLDERS.values()}


def _package_of(module: str) -> str:
    """`patho_r1.rl.dapo` -> `patho_r1.rl`; `patho_r1.data` -> `patho_r1` (the shared code)."""
    parts = module.split(".")
    sub = f"patho_r1.{parts[1]}" if len(parts) > 1 else "patho_r1"
    return sub if sub in PACKAGE_FLOOR else "patho_r1"


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):  # imports inside functions count too
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def test_imports_point_down_phases_stay_apart_and_fixtures_stay_out_of_production():
    bad = []
    for folder, (pkg, floor) in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for lineno, module in _imports(path):
                if module.split(".")[0] in FOLDERS and module.split(".")[0] != "patho_r1":
                    bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {module} outside the patho_r1 root")
                if not module.startswith("patho_r1"):
                    continue
                target = _package_of(module)
                where = f"{path.relative_to(ROOT)}:{lineno}: {pkg} -> {module}"
                if target == "patho_r1.fixtures" and floor < 3 and pkg != target:
                    bad.append(f"{where} (production code imports the fixtures)")
                elif target != pkg and PACKAGE_FLOOR[target] > floor:
                    bad.append(f"{where} (points up)")
                elif target != pkg and floor == PACKAGE_FLOOR[target] == 2:
                    bad.append(f"{where} (one phase imports another)")
                elif pkg == "patho_r1.rewards" and target != pkg:
                    bad.append(f"{where} (the rewards import nothing of ours)")
    assert not bad, "\n".join(bad)


def test_the_import_graph_check_catches_an_upward_edge(tmp_path, monkeypatch):
    """The check above would fail on the old layout, where `rewards/cli.py` imported the data loaders."""
    fake = tmp_path / "rewards"
    fake.mkdir()
    (fake / "cli.py").write_text("def f():\n    from patho_r1.data import iter_raw_rows\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "FOLDERS", {"rewards": ("patho_r1.rewards", 0)})
    with pytest.raises(AssertionError, match=r"rewards/cli.py:2: patho_r1.rewards -> patho_r1.data \(points up\)"):
        test_imports_point_down_phases_stay_apart_and_fixtures_stay_out_of_production()


def _module_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same folder it imports, lazy imports inside functions included (only imports
    under `if TYPE_CHECKING:` are left out: they never run)."""
    modules = {p.stem: p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and id(node) not in typing_only:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                graph[name] |= {t.rsplit(".", 1)[-1] for t in targets
                                if t.rsplit(".", 1)[0] == package and t.rsplit(".", 1)[-1] in modules}
        graph[name].discard(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n, [])) is not None), None)


def test_the_shared_modules_import_each_other_without_a_cycle():
    """`patho_r1.config` once imported `patho_r1.training` inside a method while training imported the config: a
    cycle hidden behind a lazy import.  The shared floor (patho/) and the rewards have none."""
    for folder, package in (("patho", "patho_r1"), ("rewards", "patho_r1.rewards")):
        cycle = _cycle(_module_graph(ROOT / folder, package))
        assert cycle is None, f"{folder}/: import cycle {' -> '.join(cycle)}"


def test_the_cycle_check_sees_a_lazy_import(tmp_path):
    (tmp_path / "config.py").write_text("from patho_r1.errors import E\n\n"
                                        "def f():\n    from patho_r1.training import T\n")
    (tmp_path / "training.py").write_text("from patho_r1.config import C\n")
    (tmp_path / "errors.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from patho_r1.config import C\n")
    graph = _module_graph(tmp_path, "patho_r1")
    assert graph == {"config": {"errors", "training"}, "training": {"config"}, "errors": set()}
    assert _cycle(graph) == ["config", "training", "config"]


@pytest.mark.slow
def test_the_wheel_holds_only_the_patho_r1_package(tmp_path):
    """`pip install .` exposes `patho_r1` and the `patho-r1` command, and no top-level `rl`, `sft`, `launch`..."""
    # build from a clean copy: setuptools builds in the source tree, and a stale build/ there could add old files
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                              "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("patho_r1-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top = {n.split("/")[0] for n in names}
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {t for t in top if not t.endswith(".dist-info")} == {"patho_r1"}
    for package in ("rewards", "sft", "rl", "embed", "eval", "launch", "fixtures"):
        assert f"patho_r1/{package}/__init__.py" in names
    assert "patho_r1/data.py" in names and "patho_r1/rl/dapo.py" in names
    assert "patho-r1 = patho_r1.launch.cli:main" in entry_points


def test_no_old_top_level_name_is_importable_outside_the_repo(tmp_path):
    code = ("import importlib.util, sys; "
            "names = ['rl', 'sft', 'rewards', 'embed', 'launch', 'patho', 'fixtures', 'curate'];"
            "found = [n for n in names if importlib.util.find_spec(n)]; print(found); sys.exit(1 if found else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert importlib.util.find_spec("patho_r1.rl.dapo") is not None


# ----------------------------------------------------------------------------------------------------------------------
# The phase table
# ----------------------------------------------------------------------------------------------------------------------


def test_every_phase_type_has_a_config_on_the_one_base():
    assert set(PHASES) >= {"cpt", "sft", "rl", "embed", "eval"}
    for phase in PHASES.values():
        assert issubclass(phase.config_class(), PhaseConfig), phase.name
    with pytest.raises(KeyError, match="unknown phase type 'ppo'"):
        get_phase("ppo")


class ToyConfig(PhaseConfig):
    words: list[str]


def run_toy(cfg: ToyConfig) -> PhaseResult:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "words.txt").write_text(" ".join(cfg.words))
    return PhaseResult(model_dir=out, metrics={"n_words": len(cfg.words), "model": cfg.model})


@pytest.fixture
def toy_phase():
    phase = register_phase(PhaseType("toy", f"{__name__}:ToyConfig", f"{__name__}:run_toy", ray_train=False))
    yield phase
    PHASES.pop("toy")


def test_a_new_phase_type_is_one_table_entry(toy_phase, tmp_path):
    from patho_r1.launch.workers import run_phase

    raw = {"name": "t", "output_root": str(tmp_path / "out"), "model": {"base": "tiny"}, "data": {"root": "."},
           "phases": [{"name": "words", "type": "toy", "config": {"words": ["gland", "stroma"]}}]}
    plan = build_plan(raw)
    cfg = plan.phase("words").config
    assert isinstance(cfg, ToyConfig) and cfg.model == plan.recipe.base_model_path and cfg.use_cpu is True
    result = run_phase("toy", cfg.model_dump(mode="json"))
    assert result["metrics"]["n_words"] == 2
    assert (tmp_path / "out/words/words.txt").read_text() == "gland stroma"
    raw["phases"][0]["type"] = "toyy"
    with pytest.raises(ConfigError, match="unknown phase type 'toyy'"):
        build_plan(raw)
    with pytest.raises(ValueError, match="already registered"):
        register_phase(toy_phase)


# ----------------------------------------------------------------------------------------------------------------------
# The config base: one reading of `use_cpu`, wandb everywhere
# ----------------------------------------------------------------------------------------------------------------------


def _configs(world_dir, tmp_path):
    from patho_r1.embed.config import EmbedPhaseConfig
    from patho_r1.eval.phase import EvalPhaseConfig
    from patho_r1.sft.config import SFTPhaseConfig

    common = {"model": "org/model", "output_dir": str(tmp_path)}
    return [SFTPhaseConfig(data=str(world_dir / "sft/train.jsonl"), **common),
            EmbedPhaseConfig(stage1={"curriculum": [{"data": str(world_dir / "embed/text_pairs.jsonl")}]}, **common),
            EvalPhaseConfig(data=str(world_dir / "eval/PathoSynth_MCQ.tsv"), **common)]


def test_use_cpu_unset_means_the_gpu_when_there_is_one_in_every_phase(world_dir, tmp_path, monkeypatch):
    import torch

    configs = _configs(world_dir, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [c.runs_on_cpu() for c in configs] == [False, False, False]
    assert [c.model_copy(update={"use_cpu": True}).runs_on_cpu() for c in configs] == [True, True, True]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [c.runs_on_cpu() for c in configs] == [True, True, True]


def test_the_embedder_moves_to_the_gpu_when_use_cpu_is_unset(tiny_model_dir, world_dir, tmp_path, monkeypatch):
    import torch

    from patho_r1.embed.config import EmbedPhaseConfig
    from patho_r1.embed.model import Embedder
    from patho_r1.embed.train import build_embedder

    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(Embedder, "to", lambda self, device: moved.append(device) or self)
    cfg = EmbedPhaseConfig(model=str(tiny_model_dir), output_dir=str(tmp_path),
                           stage1={"curriculum": [{"data": str(world_dir / "embed/text_pairs.jsonl")}]})
    build_embedder(cfg)
    assert moved == ["cuda:0"]


def test_eval_scores_one_model_given_as_model(world_dir, tmp_path):
    from patho_r1.eval.phase import EvalPhaseConfig

    cfg = EvalPhaseConfig(data=str(world_dir / "eval/PathoSynth_MCQ.tsv"), model="org/m", output_dir=str(tmp_path))
    assert cfg.checkpoints == {"model": "org/m"}
    with pytest.raises(ConfigError, match="checkpoints: name at least one"):
        validate_config(EvalPhaseConfig, {"data": str(world_dir / "eval/PathoSynth_MCQ.tsv"),
                                          "output_dir": str(tmp_path)})


# ----------------------------------------------------------------------------------------------------------------------
# Citations a clone can follow: every cited `*.md` is in the repository (or is a report our code writes)
# ----------------------------------------------------------------------------------------------------------------------

_SKIP_DIRS = {".git", ".venv", "build", "dist", "runs", "__pycache__", ".pytest_cache", "wandb"}
_MD_NAME = re.compile(r"(?<![\w/.:-])((?:\.\./|\./)*[\w.-]+(?:/[\w.-]+)*\.md)(#[\w-]+)?(?![\w])")


def _repo_text_files(root: Path) -> list[Path]:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        out += [Path(folder) / f for f in sorted(files) if f.endswith((".py", ".md", ".yaml"))]
    return out


def _written_reports(files: list[Path]) -> set[str]:
    """Names like `report.md`, `results.md`: the Markdown files our code writes, each a string literal in it."""
    names = set()
    for path in files:
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".md"):
                    names.add(node.value.rsplit("/", 1)[-1])
    return names


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    heads = [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _bad_citations(root: Path) -> list[str]:
    """Each `*.md` named in a .py/.md/.yaml file that a clone could not open; `owner/repo:path.md` names an upstream
    file and is left alone."""
    files = _repo_text_files(root)
    reports = _written_reports(files)
    bad = []
    for path in files:
        if path.resolve() == Path(__file__).resolve():
            continue  # this file spells out bad citations to test the check
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            where = f"{path.relative_to(root)}:{lineno}"
            if re.search(r"shared/notes|§\s*\d", line):
                bad.append(f"{where}: cites notes outside the repository: {line.strip()}")
                continue
            for name, anchor in _MD_NAME.findall(line):
                candidates = [root / name, path.parent / name, root / "docs" / name]
                target = next((c for c in candidates if c.is_file() and c.resolve().is_relative_to(root)), None)
                if target is None:
                    if name.rsplit("/", 1)[-1] in reports and not name.startswith("docs/"):
                        continue  # a report our code writes, e.g. RUN_DIR/report.md
                    bad.append(f"{where}: {name} is not a file in the repository")
                elif anchor and anchor[1:] not in _anchors(target):
                    bad.append(f"{where}: {name} has no section {anchor}")
    return bad


def test_every_cited_markdown_file_and_section_is_in_the_repository():
    """A fact the code relies on lives in docs/, so a clone can follow the citation; nothing points at notes kept
    beside the repository (`../shared/notes/*.md`, `some-notes.md §2`)."""
    bad = _bad_citations(ROOT)
    assert not bad, "\n".join(bad)


def test_the_citation_check_catches_notes_outside_the_repository(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/formats.md").write_text("# Formats\n\n## PathVQA\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/ok.py").write_text('"""See docs/formats.md#pathvqa, formats.md and ../README.md."""\n'
                                        'OUT = "report.md"\n'
                                        '"""The run writes RUN_DIR/report.md."""\n')
    (tmp_path / "pkg/bad.py").write_text('"""Layouts follow dataset-formats.md."""\n'
                                         '"""See rl-pitfalls §3."""\n'
                                         '"""See docs/formats.md#pathmmu."""\n'
                                         '# from ../shared/notes/gpu-facts.md\n')
    (tmp_path / "README.md").write_text("Facts: [notes](../notes/memory.md), [ok](docs/formats.md).\n")
    bad = _bad_citations(tmp_path)
    assert [b.split(": ", 1)[0] for b in bad] == ["README.md:1", "pkg/bad.py:1", "pkg/bad.py:2", "pkg/bad.py:3",
                                                  "pkg/bad.py:4"], bad
    assert "../notes/memory.md is not a file" in bad[0] and "dataset-formats.md is not a file" in bad[1]
    assert "notes outside" in bad[2] and "has no section #pathmmu" in bad[3] and "notes outside" in bad[4]
