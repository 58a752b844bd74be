"""Rules the whole product keeps: layering, no library privates, Ray's hooks as we override them.

These fail loudly when a dependency's public API moves under us (e.g. a Ray upgrade renames a hook
we override) or when a module starts reaching into a library's internals.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tune", "minimind_train")
MODULES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).glob("*.py") if p.name != "__init__.py")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported_modules(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", [p for p in MODULES if p.parent.name == "minimind_train"], ids=lambda p: p.name)
def test_the_trainer_never_imports_the_tuning_stack(path: Path) -> None:
    assert not _imported_modules(_tree(path)) & {"ray", "optuna", "mlflow", "tune"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_module_states_its_job_and_its_public_names(path: Path) -> None:
    tree = _tree(path)
    assert ast.get_docstring(tree), f"{path.name}: no module docstring"
    names = [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
    assert "__all__" in names, f"{path.name}: no __all__"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_private_attribute_of_a_library_is_used(path: Path) -> None:
    """``x._name`` is allowed on our own objects only (self, cls, our classes and modules)."""
    tree = _tree(path)
    libraries = {alias.asname or alias.name.split(".")[0]
                 for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                 and (isinstance(node, ast.Import) or node.level == 0)
                 for alias in node.names}
    libraries -= {"__future__"}
    offending = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and re.match(r"_[a-z]", node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in libraries):
            offending.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            private = [p for p in node.module.split(".") if p.startswith("_")]
            private += [a.name for a in node.names if re.match(r"_[a-z]", a.name)]
            if private:
                offending.append(f"from {node.module} import ... (line {node.lineno})")
    assert not offending, f"{path.name} reaches into a library's internals: {offending}"


def test_ray_hooks_we_override_keep_their_signatures() -> None:
    """RecordSearcher, RecordScheduler and our callbacks override these public hooks by name."""
    from ray import tune
    from ray.tune import Callback
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import Searcher

    def params(func: object) -> list[str]:
        return list(inspect.signature(func).parameters)

    assert params(Searcher.suggest) == ["self", "trial_id"]
    assert params(Searcher.on_trial_complete)[:4] == ["self", "trial_id", "result", "error"]
    assert params(FIFOScheduler.on_trial_result) == ["self", "tune_controller", "trial", "result"]
    assert params(Callback.on_trial_result)[:5] == ["self", "iteration", "trials", "trial", "result"]
    for name in ("report", "get_checkpoint", "with_parameters", "with_resources", "Tuner", "TuneConfig",
                 "RunConfig", "FailureConfig", "Checkpoint"):
        assert hasattr(tune, name), f"ray.tune.{name} is gone"


def test_installed_ray_is_the_pinned_one() -> None:
    """The pin in pyproject.toml is what the hooks above were checked against."""
    import ray

    pin = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<([\d.]+)"', (REPO / "pyproject.toml").read_text()).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:2])
    assert as_tuple(pin[0]) <= as_tuple(ray.__version__) < as_tuple(pin[1]), (ray.__version__, pin)


def test_project_metadata_builds_without_deprecation_warnings() -> None:
    """setuptools warns (twice per install) on a ``project.license`` table; the SPDX string form it
    wants exists from setuptools 77 on, so the build requires that."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert isinstance(meta["project"]["license"], str), meta["project"]["license"]
    (setuptools,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert tuple(int(x) for x in setuptools.split(">=")[1].split(".")) >= (77,), setuptools



def test_every_folder_under_a_package_is_listed_so_install_is_quiet() -> None:
    """setuptools prints a 40-line "Package would be ignored" warning per folder under a listed package
    that is not itself listed (the bundled tokenizers and demo data): `make install` showed three."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

    packages = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    folders = {".".join(d.relative_to(REPO).parts) for p in packages for d in (REPO / p.replace(".", "/")).iterdir()
               if d.is_dir() and d.name != "__pycache__" and any(f.is_file() for f in d.iterdir())}
    assert folders <= packages, sorted(folders - packages)

TUNE_MODULES = [p for p in MODULES if p.parent.name == "tune"]
# Every module of the product and its tools: the direction is decided in tune/objective.py alone.
SCRIPTS = sorted(p for folder in ("benchmarks", "scripts") for p in (REPO / folder).glob("*.py"))
_DIRECTIONS = {"min", "max", "minimize", "maximize"}


def _strings(node: ast.AST) -> set[str]:
    """The string constants ``node`` is, or holds as a tuple, list or set: ``"min"``, ``("min", "max")``."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _direction_sites(tree: ast.Module) -> list[str]:
    """Where a module decides the objective's direction itself: ``mode == "min"``, ``mode in ("min", ...)``,
    ``x.mode != y``, a mapping or ``match`` keyed by a direction, Optuna's direction names or
    ``StudyDirection.MINIMIZE``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = (node.left, *node.comparators)
            if set().union(*map(_strings, operands)) & _DIRECTIONS or any(
                    isinstance(n, ast.Attribute) and n.attr == "mode" for n in operands):
                found.append(f"a comparison with the mode (line {node.lineno})")
        elif isinstance(node, ast.Dict) and set().union(*(_strings(k) for k in node.keys if k)) & _DIRECTIONS:
            found.append(f"a mapping keyed by the mode (line {node.lineno})")
        elif isinstance(node, ast.MatchValue) and _strings(node.value) & _DIRECTIONS:
            found.append(f"a match case on the mode (line {node.lineno})")
        elif isinstance(node, ast.Constant) and str(node.value).lower() in {"minimize", "maximize"}:
            found.append(f"{node.value!r} (line {node.lineno})")
        elif isinstance(node, ast.Attribute) and node.attr in {"MINIMIZE", "MAXIMIZE"}:
            found.append(f".{node.attr} (line {node.lineno})")
    return found


@pytest.mark.parametrize("path", [p for p in MODULES + SCRIPTS if p.name != "objective.py"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_only_tune_objective_knows_which_way_is_better(path: Path) -> None:
    """The objective's direction is decided in one place, :class:`tune.objective.Objective`."""
    assert not _direction_sites(_tree(path)), f"{path.name} decides the direction itself: {_direction_sites(_tree(path))}"


def test_the_direction_check_finds_what_it_looks_for() -> None:
    assert (REPO / "tune" / "objective.py").is_file() and SCRIPTS
    assert _direction_sites(_tree(REPO / "tune" / "objective.py"))
    sample = ast.parse('a = 1 if t.mode == "min" else -1\nb = "maximize"\nc = d.StudyDirection.MINIMIZE\n'
                       'e = f.mode != g\nh = "max" == mode\ni = mode in ("max", "min")\n'
                       'j = {"min": 1, "max": -1}[mode]\nmatch mode:\n    case "min":\n        pass\n'
                       'ok = min(values)\nok = {"minimum": 1}\nok = Objective("loss", "min")\nok = x in ("a", "b")')
    assert len(_direction_sites(sample)) == 8, _direction_sites(sample)


def _status_literals(tree: ast.Module) -> list[str]:
    from tune.status import TrialStatus

    values = {s.value for s in TrialStatus}
    exported = {id(n) for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
                for n in ast.walk(node.value)}  # (``__all__`` names functions, e.g. tune.warmstart.warm_start)
    return [f"{node.value!r} (line {node.lineno})" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in values and id(node) not in exported]


@pytest.mark.parametrize("path", [p for p in TUNE_MODULES if p.name != "status.py"], ids=lambda p: p.name)
def test_trial_statuses_are_named_through_tune_status_only(path: Path) -> None:
    """A status is a :class:`tune.status.TrialStatus` member: its text, Optuna state and meaning are in one place."""
    found = _status_literals(_tree(path))
    assert not found, f"{path.name} spells statuses itself: {found}"


def test_every_status_is_in_the_table() -> None:
    from tune import status

    table = (status.__doc__ or "").split("=============  ========")[2]
    assert {line.split()[0] for line in table.splitlines() if line[:1].strip()} == {s.value for s in status.TrialStatus}


# Renames outside tune.atomic, each for a reason: folders published or moved, never a file written.
_RENAMES_ALLOWED = {
    "atomic.py": 99,  # the one write-and-rename
    "study.py": 1,  # a new study folder: must never replace one that appeared meanwhile
    "restart.py": 2,  # --restart moves the old study aside and back
    "checkpoint.py": 3,  # the trainer's checkpoint folder (minimind_train never imports tune), and its leftovers' suffix
    "token_cache.py": 2,  # a token cache folder: a concurrent build's is kept, not replaced
}


def _renames(tree: ast.Module) -> list[str]:
    """Hand-written write-and-rename: ``os.replace``/``os.rename``/``shutil.move`` calls, ``.tmp`` names."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                and (node.func.value.id, node.func.attr) in {("os", "replace"), ("os", "rename"), ("shutil", "move")}):
            found.append(f"{node.func.value.id}.{node.func.attr} (line {node.lineno})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".tmp"):
            found.append(f"{node.value!r} (line {node.lineno})")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_files_are_written_whole_through_tune_atomic(path: Path) -> None:
    found = _renames(_tree(path))
    assert len(found) <= _RENAMES_ALLOWED.get(path.name, 0), f"{path.name} renames by hand (use tune.atomic): {found}"


def _project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports anywhere (module level, in functions, under TYPE_CHECKING)."""
    package, found = path.parent.name, set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else (node.module or "")
            base = f"{base}.{node.module}" if node.level and node.module else base
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {n for n in names if n in _MODULE_NAMES}
    return found - {f"{package}.{path.stem}"}


_MODULE_NAMES = {f"{p.parent.name}.{p.stem}" for p in MODULES}


def test_no_import_cycle_among_the_projects_modules() -> None:
    graph = {f"{p.parent.name}.{p.stem}": _project_imports(p) for p in MODULES}
    assert graph["minimind_train.model3"] and graph["tune.report"]  # (the walk finds imports)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            cycle = path[path.index(module):] + (module,)
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


# What a parameter of each name may be: the study's spec (typed, or its dict form as stored), its record
# (the object, or the path of its optuna.db), an Optuna study; each may be None where the signature says so.
_STUDY_PARAMETERS = {"spec": {"StudySpec", "Mapping[str, Any]", "dict[str, Any]"},
                     "record": {"Study", "Path"},
                     "study": {"optuna.Study", "_Study"}}


def _parameters(tree: ast.Module) -> Iterator[tuple[str, ast.arg]]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs):
                if arg.arg not in {"self", "cls"}:
                    yield node.name, arg


def _untyped(tree: ast.Module) -> list[str]:
    """Parameters without a type, and a spec, record or study typed otherwise than :data:`_STUDY_PARAMETERS` says."""
    return [f"{func}({arg.arg}: {ast.unparse(arg.annotation) if arg.annotation else '-'}) line {arg.lineno}"
            for func, arg in _parameters(tree)
            if arg.annotation is None or ast.unparse(arg.annotation).removesuffix(" | None") not in
            _STUDY_PARAMETERS.get(arg.arg, {ast.unparse(arg.annotation).removesuffix(" | None")})]


@pytest.mark.parametrize("path", TUNE_MODULES, ids=lambda p: p.name)
def test_the_study_objects_are_typed_in_every_signature(path: Path) -> None:
    """A spec, record or study is never ``Any`` nor unannotated, and every parameter of tune/ has a type."""
    assert not _untyped(_tree(path)), f"{path.name}: {_untyped(_tree(path))}"


def test_the_typing_check_finds_what_it_looks_for() -> None:
    sample = ast.parse("def f(spec: Any, record, study: optuna.Study, n: int, m) -> None: ...\n"
                       "def g(self, spec: StudySpec, record: Study, *, study: Any = None) -> None: ...")
    assert [line.split("(")[1].split(":")[0] for line in _untyped(sample)] == ["spec", "record", "m", "study"]
