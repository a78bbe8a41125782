"""The shape of `core/`: its import graph has no cycle, no stage imports a later one, and nothing
below training loads PyTorch. Beside tests/test_app_smoke.py's "core never imports Streamlit".

The graph is read from the source (every import statement, those inside functions too), so a
lazy import counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

CORE = ROOT / "core"

# Data flows one way, and so do imports: a module may import its own stage and earlier ones.
# Ingest stands on the catalog it writes into; the entry points (the `loupe` command, the worker
# process that trains a run and records its figures) on everything.
STAGES = ("foundation", "catalog", "ingest", "embeddings", "training", "runs", "review", "export", "entry")

STAGE_OF = {
    # What every stage stands on: errors, the decoder, settings, opening a workspace and bringing
    # its catalog to the current schema, identities and the audit log (stdlib and argon2 only).
    "core": "foundation",
    "core.errors": "foundation",
    "core.config": "foundation",
    "core.images": "foundation",
    "core.workspace": "foundation",
    "core.schema": "foundation",
    "core.auth": "foundation",
    "core.audit": "foundation",
    # Every read and write of images, classes, labels, reviews and accounts, and which images a run sees.
    "core.catalog": "catalog",
    "core.accounts": "catalog",
    "core.reviews": "catalog",
    "core.selection": "catalog",
    "core.perceptual_hash": "catalog",
    "core.ingest": "ingest",
    # Work on cached feature vectors, without the network that made them.
    "core.similar": "embeddings",
    "core.embedding_map": "embeddings",
    # The pretrained network: building it, computing and caching its features, training, checkpoints.
    "core.backbones": "training",
    "core.embeddings": "training",
    "core.checkpoints": "training",
    "core.training": "training",
    "core.calibration": "training",
    "core.fewshot": "training",
    "core.search": "training",
    # Where a job's training and embedding run: in the worker, or on a Ray cluster.
    "core.executors": "training",
    "core.executor_ray": "training",
    "core.jobs": "runs",
    "core.metrics": "review",
    "core.compare": "review",
    "core.hard": "review",
    "core.explain": "review",
    "core.cam_cache": "review",
    "core.uncertainty": "review",
    "core.export": "export",
    "core.bundle_predict": "export",
    "core.dataset_export": "export",
    "core.model_card": "export",
    "core.backup": "export",
    "core.cli": "entry",
    "core.serve": "entry",
    "core.worker": "entry",
}

# Packages that load PyTorch when imported.
TORCH_PACKAGES = {"torch", "torchvision", "timm", "pytorch_grad_cam"}
# The dashboard stands on core, never the other way round.
UI_PACKAGES = {"dashboard", "pages", "streamlit"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module `path` imports anywhere in it: core modules by name, others by top-level package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from core import jobs` imports the module core.jobs; `from core.jobs import x` core.jobs.
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {base})
    return {name if name.split(".")[0] == "core" else name.split(".")[0] for name in found}


def import_graph() -> dict[str, set[str]]:
    """Each core module with the modules it imports (core ones by name, others by package)."""
    paths = {module_name(path): path for path in sorted(CORE.rglob("*.py"))}
    known = set(paths)
    graph = {}
    for name, path in paths.items():
        edges = imports_of(path, known)
        # `import core.x.y` names core.x.y; a name below a module resolves to the module.
        graph[name] = {_known_prefix(edge, known) if edge.startswith("core") else edge for edge in edges} - {name}
    return graph


def _known_prefix(name: str, known: set[str]) -> str:
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def unclassified(graph: dict[str, set[str]], stage_of: dict[str, str]) -> list[str]:
    return sorted(set(graph) - set(stage_of))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among core modules as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for following in sorted(graph.get(node, ())):
            if following not in graph:
                continue
            if state.get(following) == 1:
                return path[path.index(following):] + [following]
            if following not in state and (cycle := visit(following)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def backward_edges(graph: dict[str, set[str]], stage_of: dict[str, str]) -> list[str]:
    """Imports of a later stage (or of the dashboard), described."""
    rank = {stage: i for i, stage in enumerate(STAGES)}
    found = []
    for module, edges in sorted(graph.items()):
        for imported in sorted(edges):
            if imported in UI_PACKAGES:
                found.append(f"{module} imports {imported}: core never imports the dashboard")
            elif imported in stage_of and module in stage_of and rank[stage_of[imported]] > rank[stage_of[module]]:
                found.append(
                    f"{module} ({stage_of[module]}) imports {imported} ({stage_of[imported]}), a later stage: "
                    f"move what it needs down to the {stage_of[module]} stage or below, or the importer up"
                )
    return found


def torch_below_training(graph: dict[str, set[str]], stage_of: dict[str, str]) -> list[str]:
    """Modules below training that load PyTorch, each with the chain of imports that does it."""
    rank = {stage: i for i, stage in enumerate(STAGES)}
    found = []
    for module in sorted(graph):
        if module not in stage_of or rank[stage_of[module]] >= rank["training"]:
            continue
        chain = _chain_to_torch(graph, module)
        if chain:
            found.append(f"{module} ({stage_of[module]}) loads PyTorch: {' -> '.join(chain)}")
    return found


def _chain_to_torch(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest chain of imports from `start` to a PyTorch package, or None."""
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for following in sorted(graph.get(node, ())):
            if following in TORCH_PACKAGES:
                chain = [following, node]
                while previous[chain[-1]] is not None:
                    chain.append(previous[chain[-1]])
                return chain[::-1]
            if following in graph and following not in previous:
                previous[following] = node
                queue.append(following)
    return None


# ---------------------------------------------------------------- the checks, on core/


def test_every_core_module_has_a_stage():
    missing = unclassified(import_graph(), STAGE_OF)
    assert not missing, (
        f"core module(s) without a stage: {', '.join(missing)}. Add each to STAGE_OF in "
        f"tests/test_pipeline_shape.py, in the earliest of {', '.join(STAGES)} whose modules it imports."
    )


def test_core_imports_form_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_core_module_imports_a_later_stage():
    assert backward_edges(import_graph(), STAGE_OF) == []


def test_nothing_below_training_loads_pytorch():
    assert torch_below_training(import_graph(), STAGE_OF) == []


# ---------------------------------------------------------------- the checks themselves


def test_the_graph_sees_imports_inside_functions_and_from_package_imports():
    graph = import_graph()
    assert "core.schema" in graph["core.workspace"]  # imported inside open_workspace
    assert {"core.catalog", "core.selection"} <= graph["core.uncertainty"]  # `from core import catalog, selection`
    assert "torch" in graph["core.training"] and "streamlit" not in graph["core.training"]


def test_the_checks_catch_a_cycle_a_later_stage_import_an_unclassified_module_and_torch_below_training():
    graph = {
        "core.catalog": {"core.ingest", "sqlite_utils"},
        "core.ingest": {"core.catalog", "core.helpers"},
        "core.helpers": {"torch"},
        "core.export": {"core.catalog", "pages"},
    }
    stage_of = {"core.catalog": "catalog", "core.ingest": "ingest", "core.export": "export"}

    assert find_cycle(graph) == ["core.catalog", "core.ingest", "core.catalog"]
    assert unclassified(graph, stage_of) == ["core.helpers"]
    later, ui = backward_edges(graph, stage_of)
    assert later.startswith("core.catalog (catalog) imports core.ingest (ingest), a later stage")
    assert ui.startswith("core.export imports pages")
    assert torch_below_training(graph, stage_of) == [
        "core.catalog (catalog) loads PyTorch: core.catalog -> core.ingest -> core.helpers -> torch",
        "core.ingest (ingest) loads PyTorch: core.ingest -> core.helpers -> torch",
    ]
