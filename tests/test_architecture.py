"""The package's wings and the imports that must never exist between them (design brief: "The layout
it grows into"), read from the source itself."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = "echoshot_ai_server"
ROOT = REPO_ROOT / PACKAGE
WINGS = ("engine", "media", "adapters", "app", "dev")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str) -> set[str]:
    """Every module of the package that `source` (the module `module`) imports, as a dotted name."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from package import module`
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def part(name: str) -> str:
    """The wing of a module (`engine`, ...) or its top-level module (`config`, `cli`, ...)."""
    rest = name.split(".")[1:]
    return rest[0] if rest else ""


def reads_environment(source: str) -> bool:
    """Whether the source reads os.environ / os.getenv (setting a variable for a library is no read)."""
    tree = ast.parse(source)
    written = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)}
    return any(isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and isinstance(node.value, ast.Name)
               and node.value.id == "os" and id(node) not in written for node in ast.walk(tree))


def violations(module: str, source: str) -> list[str]:
    """The never-arrows that `module` would draw with this source."""
    here = part(module)
    found = []
    for target in sorted(imports(source, module)):
        there = part(target)
        rule = None
        if here == "engine" and there in ("config", "job", "errors", "media", "adapters", "app", "dev"):
            rule = "the engine takes plain values and raises plain exceptions"
        elif here == "media" and there in ("engine", "adapters", "app", "config", "job", "dev"):
            rule = "the video tools know nothing of the model, AWS or jobs"
        elif here == "adapters" and there in ("app", "engine", "media", "config", "dev"):
            rule = "adapters know nothing of tasks, the loop or the engine"
        elif there == "config" and module not in (f"{PACKAGE}.cli", f"{PACKAGE}.app.wiring"):
            rule = "only the command line and the wiring read the settings"
        elif there in ("cli", "main") and module != f"{PACKAGE}.main":
            rule = "nothing imports the entry points"
        elif there == "dev" and here != "dev":
            rule = "product code never imports the local stand-ins"
        if rule:
            found.append(f"{module} imports {target}: {rule}")
    if here != "config" and reads_environment(source):
        found.append(f"{module} reads the environment: only config.py does")
    return found


def package_modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_the_wings_exist():
    for wing in WINGS:
        assert (ROOT / wing / "__init__.py").is_file()
    assert not (ROOT / "tasks").exists()


def test_no_module_draws_a_forbidden_arrow():
    found = [v for path in package_modules() for v in violations(module_name(path), path.read_text())]
    assert found == []


@pytest.mark.parametrize("module, source", [
    ("echoshot_ai_server.engine.upscaler", "from echoshot_ai_server.config import Settings"),
    ("echoshot_ai_server.engine.upscaler", "from ..errors import PermanentError"),
    ("echoshot_ai_server.engine.upscaler", "from echoshot_ai_server.app import pipeline"),
    ("echoshot_ai_server.media.writer", "import echoshot_ai_server.engine.upscaler"),
    ("echoshot_ai_server.adapters.s3", "from echoshot_ai_server.app.task import UpscaleTask"),
    ("echoshot_ai_server.app.task", "from echoshot_ai_server.config import Settings"),
    ("echoshot_ai_server.app.worker", "from echoshot_ai_server.cli import main"),
    ("echoshot_ai_server.app.wiring", "from echoshot_ai_server.dev.local import MotoServer"),
    ("echoshot_ai_server.app.wiring", "import os\nos.environ.get('X')"),
    ("echoshot_ai_server.engine.device", "import os\nvalue = os.environ['X']"),
    ("echoshot_ai_server.media.probe", "import os\nos.getenv('X')"),
])
def test_each_forbidden_arrow_is_caught(module, source):
    assert violations(module, source) != []


def test_allowed_arrows_pass():
    assert violations("echoshot_ai_server.app.wiring", "from echoshot_ai_server.config import Settings") == []
    assert violations("echoshot_ai_server.main", "from echoshot_ai_server.cli import main") == []
    assert violations("echoshot_ai_server.adapters.spring", "from echoshot_ai_server.job import CallbackPayload") == []
    assert violations("echoshot_ai_server.job", "from echoshot_ai_server.engine.specs import scale_problem") == []
    assert violations("echoshot_ai_server.engine.device", "import os\nos.environ['TRITON_CACHE_DIR'] = 'x'") == []


def test_the_local_pipeline_needs_no_aws_libraries():
    # `echoshot upscale` and the GPU benchmarks run where boto3 is not installed
    code = ("import sys; sys.modules['boto3'] = sys.modules['botocore'] = None; "
            "import echoshot_ai_server.app.wiring, echoshot_ai_server.app.pipeline, echoshot_ai_server.engine.upscaler")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
