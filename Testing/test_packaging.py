"""What can be checked of the Slicer extension without the Slicer application: the panel's .ui against the
code that uses it, the CMake lists against the files, the extension descriptions, and the import-time rules."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import fields
from pathlib import Path

from SegmentWithSAMSlicerLib import dependencies

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SegmentWithSAM"
SOURCE = (MODULE / "SegmentWithSAM.py").read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)
UI = ET.parse(MODULE / "Resources" / "UI" / "SegmentWithSAM.ui").getroot()


def ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in UI.iter("widget")}


def test_every_widget_the_code_uses_is_in_the_ui():
    used = {node.attr for node in ast.walk(TREE) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
    assert used, "the widget uses self.ui.<name>"
    assert not used - set(ui_widgets()), f"missing in the .ui: {sorted(used - set(ui_widgets()))}"


def test_the_panel_binds_the_selected_nodes_and_exactly_the_settings_with_their_choices():
    """The .ui's parameter names are the parameter node's node fields and the shared settings' fields, and its
    combo boxes hold no items of their own: ``connectGui`` fills them from the settings' choices (the model
    registry, the devices, the CT presets), which the parameter node is made of."""
    from SegmentWithSAMLib.models import registry
    from SegmentWithSAMLib.preprocessing import CT_PRESETS
    from SegmentWithSAMSlicerLib.settings import Settings, model_choices

    maker = next(n for n in TREE.body if isinstance(n, ast.FunctionDef) and n.name == "parameterNodeClass")
    nodes = next(n.value for n in ast.walk(maker) if isinstance(n, ast.Assign) and n.targets[0].id == "annotations")
    bound = {p.find("string").text for p in UI.iter("property") if p.get("name") == "SlicerParameterName"}
    settings = {f.name for f in fields(Settings)}
    assert settings <= bound and bound - settings <= {key.value for key in nodes.keys}, sorted(bound)
    combos = [w for w in UI.iter("widget") if w.get("class") in ("QComboBox", "ctkComboBox")]
    assert combos and all(w.find("item") is None for w in combos)
    assert model_choices()[0] == "litemedsam" and set(model_choices()) == set(registry())
    chosen = {f.name: f.metadata["choices"]() for f in fields(Settings) if "choices" in f.metadata}
    assert chosen["model_window"] == ["display", "auto", *CT_PRESETS]
    assert chosen["device"] == ["auto", "cpu", "cuda", "mps"]


def test_the_panels_prompt_fields_are_the_front_ends_prompt_kinds():
    from SegmentWithSAMSlicerLib.front_end import PROMPTS

    mapping = next(n.value for n in TREE.body if isinstance(n, ast.Assign) and n.targets[0].id == "PROMPT_PARAMETERS")
    maker = next(n for n in TREE.body if isinstance(n, ast.FunctionDef) and n.name == "parameterNodeClass")
    nodes = next(n.value for n in ast.walk(maker) if isinstance(n, ast.Assign) and n.targets[0].id == "annotations")
    assert [key.value for key in mapping.keys] == list(PROMPTS)
    assert {value.value for value in mapping.values} <= {key.value for key in nodes.keys}


def test_module_imports_no_model_code_at_import_time():
    top = {alias.name.split(".")[0] for node in TREE.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in TREE.body if isinstance(node, ast.ImportFrom) and node.module}
    allowed = {"__future__", "dataclasses", "functools", "logging", "os", "shutil", "sys", "traceback", "typing", "qt",
               "slicer", "vtk"}
    assert top <= allowed, top


def test_cmake_lists_every_python_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui|txt|json|nii\.gz))\s*$", text, re.M))
    listed = {name.replace("${MODULE_NAME}", "SegmentWithSAM") for name in listed}
    present = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "Lib" in p.parts[len(MODULE.parts)]}
    assert present <= listed, sorted(present - listed)
    assert all((MODULE / name).is_file() for name in listed), [n for n in listed if not (MODULE / n).is_file()]


def test_extension_metadata_passes_the_extensions_index_checks():
    """What the Extensions Index's scripts/check_description_files.py checks without the network: the entry
    against schema v1.0.1 (required and allowed keys, their types), the category, the SCM URL's scheme, the
    top-level CMake project named as the entry, icon and screenshot URLs, the licence file at the root. (Its
    repository-name check needs a repository named Slicer…; the README says what the submission needs.)"""
    catalog = json.loads((ROOT / "SegmentWithSAM.json").read_text(encoding="utf-8"))
    types = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
             "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
    assert {"$schema", "category", "scm_url"} <= set(catalog) <= set(types), sorted(catalog)
    assert all(isinstance(value, types[key]) for key, value in catalog.items())
    assert catalog.get("tier", 5) in (1, 3, 5) and catalog.get("scm_type", "git") in ("git", "local")
    assert catalog["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                         "slicer-extension-catalog-entry-schema-v1.0.1.json")
    assert catalog["category"] == "Segmentation" and catalog["build_dependencies"] == ["PyTorch"]
    assert catalog["scm_url"].split("://")[0] in ("git", "https")
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.findall(r"project\s*\(\s*([^\s)]+)", cmake, re.I)[0] == "SegmentWithSAM"  # = the entry's file name
    assert "cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)" in cmake  # as Slicer 5.10's template
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        urls = re.findall(rf'set\s*\({key}\s*"([^"]+)"\s*\)', cmake)[0].split()
        assert urls and all(url.startswith("https://") for url in urls), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake and 'set(EXTENSION_CATEGORY "Segmentation")' in cmake
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
    assert (ROOT / "Resources" / "Icons" / "SegmentWithSAM.png").is_file()


def _s4ext(path: Path) -> dict[str, str]:
    """Keyword → value of a .s4ext as Slicer reads one: on each line not a comment, the first token is the
    keyword and the rest of the line, trimmed, the value; the last line of a keyword wins."""
    fields = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        keyword, _, value = line.partition(" ")
        if keyword and not keyword.startswith("#"):
            fields[keyword] = value.strip()
    return fields


def test_the_s4ext_agrees_with_the_index_entry_and_the_cmake_metadata():
    # Format and keywords as Slicer defines them (github.com/Slicer/Slicer at 583e9b37d50e):
    # Utilities/Templates/Extensions/extension_description.s4ext.in, Extensions/CMake/
    # SlicerExtensionDescriptionSpec.cmake (17 keywords, scm/scmurl/scmrevision required) and the reading in
    # Extensions/CMake/SlicerFunctionExtractExtensionDescription.cmake.
    s4ext = _s4ext(ROOT / "SlicerExtension.s4ext")
    cmake_text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    cmake = {key.lower(): value for key, value in re.findall(r'set\s*\(EXTENSION_(\w+)\s+"([^"]*)"\s*\)', cmake_text)}
    catalog = json.loads((ROOT / "SegmentWithSAM.json").read_text(encoding="utf-8"))
    keywords = {"scm", "scmurl", "scmrevision", "depends", "recommends", "build_subdirectory", "homepage",
                "contributors", "category", "iconurl", "description", "screenshoturls", "enabled", "status", "tier",
                "dicom_support_rule", "keywords"}
    assert {"scm", "scmurl", "scmrevision"} <= set(s4ext) <= keywords, sorted(set(s4ext) - keywords)
    for key in ("homepage", "category", "contributors", "description", "iconurl", "screenshoturls", "depends"):
        assert s4ext[key] == cmake[key], key
    assert s4ext["scm"] == catalog.get("scm_type", "git") and s4ext["scmurl"] == catalog["scm_url"]
    assert s4ext["scmrevision"] == catalog["scm_revision"] and s4ext["category"] == catalog["category"]
    assert s4ext["depends"].split() == catalog["build_dependencies"]
    assert s4ext["build_subdirectory"] == catalog.get("build_subdirectory", ".")
    assert int(s4ext["tier"]) == catalog.get("tier", 1) and s4ext["enabled"] in ("0", "1")
    assert s4ext["homepage"] == catalog["scm_url"].removesuffix(".git")
    assert all(url.startswith("https://") for url in (s4ext["iconurl"], *s4ext["screenshoturls"].split()))


def test_requirements_file_installs_what_the_dependency_check_looks_for():
    assert list(dependencies.requirement_groups()) == ["default", "torch", "sam2"]  # Testing/test_dependencies.py
    assert dependencies.missing("sam2.1_tiny", "cuda") == []  # this environment has everything
