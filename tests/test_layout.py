"""The house rules of DESIGN.md, checked on the code itself (imports read with `ast`):

- no module of the project imports a stage (tasks/stages/ are leaves);
- arrows point one way: flows -> tasks -> (model, eval); model/ and eval/ know no pipeline;
- dvc.yaml's (and ablation/dvc.yaml's) code deps of each stage are exactly what the stage imports: its own module, the
  tasks/ packages (as folders) and the model/ and eval/ modules it reaches, so no code change can
  leave a stale output and none reruns a stage that does not use it;
- every stage output path is spelled once in the code (tasks/config/paths.py) and agrees with
  dvc.yaml's outs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tasks.config import paths

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("tasks", "flows", "model", "eval")
PIPELINE_FILES = ("dvc.yaml", "ablation/dvc.yaml")  # the pipeline, and the ablation study beside it
STAGES = {name: stage for file in PIPELINE_FILES for name, stage in yaml.safe_load((REPO / file).read_text())["stages"].items()}


def module_file(name: str) -> Path | None:
    """tasks.storage.atomic -> tasks/storage/atomic.py (a package -> its __init__.py)."""
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every project module `path` imports, at any depth of the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from tasks.stages import prepare` imports the module tasks.stages.prepare
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PROJECT and module_file(name):
                found.add(name)
    return found


def closure(path: Path) -> set[Path]:
    """The project files `path` runs: itself, what it imports, recursively, with each package's
    __init__.py on the way."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in imported_modules(current):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:depth]))
                if found:
                    todo.append(found)
    return seen


def project_files() -> list[Path]:
    return sorted(path for folder in PROJECT for path in (REPO / folder).rglob("*.py"))


def expected_code_deps(stage: str) -> set[str]:
    """The stage's module, the tasks/ packages it reaches as folders, model/ and eval/ files."""
    deps = set()
    for path in closure(REPO / "tasks" / "stages" / f"{stage}.py"):
        relative = path.relative_to(REPO)
        if relative.name == "__init__.py" and relative.parent.name in ("tasks", "model", "eval", "stages"):
            continue  # package markers: tasks/__init__.py only sets an environment variable
        if relative.parts[:2] == ("tasks", "stages"):
            deps.add(relative.as_posix())
        elif relative.parts[0] == "tasks":
            deps.add("/".join(relative.parts[:2]))
        else:
            deps.add(relative.as_posix())
    return deps


def test_no_module_imports_a_stage():
    offenders = [f"{path.relative_to(REPO)} imports {name}" for path in project_files()
                 for name in imported_modules(path) if name.startswith("tasks.stages.") or name == "tasks.stages"]
    assert not offenders, "stages are leaves; move what is shared into a tasks/ package:\n" + "\n".join(offenders)


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("model", ("tasks", "flows", "eval", "ray", "prefect", "mlflow", "dvc")),
    ("eval", ("tasks", "flows", "ray", "prefect", "mlflow", "dvc")),
    ("tasks", ("flows",)),
])
def test_imports_point_one_way(folder, forbidden):
    offenders = []
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offenders += [f"{path.relative_to(REPO)}: {name}" for name in names if name.split(".")[0] in forbidden]
    assert not offenders


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_code_deps_are_exactly_what_the_stage_imports(stage):
    declared = {dep for dep in STAGES[stage].get("deps", []) if dep.split("/")[0] in PROJECT}
    expected = expected_code_deps(stage)
    assert declared == expected, (
        f"dvc.yaml stage {stage}: code deps differ from its imports.\n  missing: {sorted(expected - declared)}\n"
        f"  not imported: {sorted(declared - expected)}\n  expected list: {sorted(expected)}")


def test_stage_outputs_are_the_paths_module():
    outs = set()
    for stage in STAGES.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                outs.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    spelled = {str(value) for name, value in vars(paths).items() if name.isupper() and isinstance(value, Path)}
    assert outs <= spelled, f"dvc.yaml outputs missing from tasks/config/paths.py: {sorted(outs - spelled)}"
    # and the code spells none of them again: one home per path
    for path in project_files():
        if path.name == "paths.py":
            continue
        text = path.read_text()
        again = [out for out in ("data/latents", "data/clips", "models/unet", "models/decoder", "models/controlnet", "models/runs") if f'"{out}"' in text]
        assert not again, f"{path.relative_to(REPO)} spells {again}: import it from tasks.config.paths"


def dvc(work: Path, *args: str) -> str:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def stale_stages(work: Path) -> set[str]:
    import json

    return {name.rpartition(":")[2] for name in json.loads(dvc(work, "status", "--json") or "{}")}  # ablation/dvc.yaml:ablation -> ablation


def test_a_code_change_marks_exactly_the_stages_that_import_it(tmp_path):
    """In a scratch copy whose every stage is up to date (placeholder data, `dvc commit`), an
    edit to a preset default, to the training engine or to one model file makes `dvc status`
    report exactly the stages whose imports reach the edited file."""
    import shutil

    work = tmp_path / "repo"
    work.mkdir()
    for name in (*PIPELINE_FILES, "params.yaml"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, work / name)
    for folder in PROJECT:
        if folder != "flows":
            shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dvc(work, "init", "--no-scm", "-q")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for stage in STAGES.values():
        for kind in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = (next(iter(entry)) if isinstance(entry, dict) else entry).replace("${data.csv}", params["data"]["csv"]).replace("${data.videos_root}", params["data"]["videos_root"]).replace("${data.images}", params["data"]["images"])
                target = work / path
                if target.exists():
                    continue
                if target.suffix:  # a file: data/filtered/kept.parquet, metrics/eval.json, ...
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(path)
                else:  # a folder of shards or weights
                    target.mkdir(parents=True)
                    (target / "placeholder").write_text(path)
    dvc(work, "commit", "--force", "-q")
    assert stale_stages(work) == set()

    def uses(relative: str) -> set[str]:
        return {stage for stage in STAGES if (REPO / relative) in closure(REPO / "tasks" / "stages" / f"{stage}.py")}

    edits = {
        "tasks/config/params.py": ('"smoke": {"decode": {"clips_per_shard": 64}}', '"smoke": {"decode": {"clips_per_shard": 32}}'),
        "tasks/training/engine.py": ("def hash_seed(", "def hash_seed(  # edited\n    "),
        "model/tcm_vae.py": ('"""', '"""Edited. '),
    }
    for relative, (old, new) in edits.items():
        original = (work / relative).read_text()
        assert old in original, f"{relative}: the edit's anchor {old!r} is gone; pick another"
        (work / relative).write_text(original.replace(old, new, 1))
        expected = uses(relative)
        assert expected, f"no stage imports {relative}"
        assert stale_stages(work) == expected, relative
        (work / relative).write_text(original)
        assert stale_stages(work) == set()
