"""Every registered method, through every surface the registry generates: its `genreg` command and help, its config
round trip to flags and back, and bad input refused with a message before any work."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

import genreg.methods  # noqa: F401  (registers the methods)
from genreg import registry
from genreg.cli import add_trainer_arguments, build_parser, main
from genreg.config import add_arguments, from_namespace, to_argv

ROOT = Path(__file__).resolve().parents[1]
# Fields a method's config cannot default (a folder of the user's images, the concept to forget).
REQUIRED = {
    "train_data_dir": "subject-images",
    "validation_data_dir": "held-out",
    "forget": "star",
    "override": "circle",
    "mask": "1",
}


def argv_of(method: registry.Method) -> list[str]:
    if method.kind in ("sampler", "editor", "video"):
        return [method.command]
    return ["search" if method.kind == "search" else "train", method.name]


def example_config(method: registry.Method):
    fields = {f for f in method.config.__dataclass_fields__}
    return method.config(**{k: v for k, v in REQUIRED.items() if k in fields})


ALL = registry.methods()


def test_the_registry_lists_every_method_package():
    assert {m.name for m in ALL} >= {"adaptive-guidance", "guide-and-rescale", "textual-inversion", "cross-init"}
    assert all(m.kind in registry.KINDS for m in ALL)
    with pytest.raises(ValueError, match="choose one of"):
        registry.get("no-such-method")


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_help_names_the_method(method, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv_of(method), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert method.help.split()[0] in out and "--" in out


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_config_round_trips_through_flags(method):
    parser = argparse.ArgumentParser()
    if method.kind in (*registry.TRAINING, "search"):
        add_trainer_arguments(parser, method)
    else:
        add_arguments(parser, method.config, dashes=True)
    config = example_config(method)
    assert from_namespace(method.config, parser.parse_args(to_argv(config))) == config


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_bad_input_is_refused_with_a_message(method, tmp_path, capsys):
    if method.kind in (*registry.TRAINING, "search"):
        fields = method.config.__dataclass_fields__
        required = [
            f"--{k}={str(tmp_path) if k == 'train_data_dir' else v}" for k, v in REQUIRED.items() if k in fields
        ]
        argv = [*argv_of(method), *required, "--max_train_steps", "0"]
        message = "max_train_steps must be a positive whole number"
    elif method.kind == "editor":
        image = tmp_path / "in.png"
        image.write_bytes(b"")
        argv = [*argv_of(method), str(image), "--num_inference_steps", "0"]
        message = "num_inference_steps must be a positive whole number"
    else:
        argv = [*argv_of(method), "a red circle", "--num_inference_steps", "0"]
        message = "num_inference_steps must be a positive whole number"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("genreg: error:") and message in err and "Traceback" not in err


def _imports(path) -> set[str]:
    """Absolute names of the genreg modules a source file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts).rsplit(".", 1)[0]  # "__init__" or the module
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.startswith("genreg")}


def test_shared_layers_import_no_method_and_methods_import_no_other_method():
    shared = [p for p in (ROOT / "genreg").rglob("*.py") if "methods" not in p.parts and p.name != "cli.py"]
    for path in shared:
        assert not any(n.startswith("genreg.methods") for n in _imports(path)), path
    for package in (p for p in (ROOT / "genreg" / "methods").iterdir() if (p / "__init__.py").is_file()):
        for path in package.rglob("*.py"):
            others = {n.split(".")[2] for n in _imports(path) if n.startswith("genreg.methods.")} - {package.name}
            assert not others, (path, others)


def test_no_module_outside_scripts_is_over_400_lines():
    for folder in ("genreg", "pipelines", "ui"):
        for path in (ROOT / folder).rglob("*.py"):
            assert len(path.read_text().splitlines()) <= 420, path


def test_every_package_is_in_the_wheel():
    """pyproject lists the packages by hand (the folders map onto genreg.*): a method package left out would be
    missing from a non-editable install."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = set()
    for name, folder in setup["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert found - listed == set()
