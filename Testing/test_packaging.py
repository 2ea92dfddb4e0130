"""What can be checked of the Slicer extension without the Slicer application: the panel's .ui against the
code that uses it, the CMake lists against the files, the extension descriptions, and the import-time rules."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
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


def test_every_bound_widget_maps_to_a_parameter():
    parameter_class = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name.endswith("ParameterNode"))
    fields = {n.target.id for n in parameter_class.body if isinstance(n, ast.AnnAssign)}
    bound = {p.find("string").text for p in UI.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields, sorted(bound - fields)


def test_module_imports_no_model_code_at_import_time():
    top = {alias.name.split(".")[0] for node in TREE.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in TREE.body if isinstance(node, ast.ImportFrom) and node.module}
    assert top <= {"__future__", "logging", "os", "shutil", "sys", "typing", "qt", "slicer", "vtk"}, top


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


def test_requirements_file_installs_what_the_dependency_check_looks_for():
    text = dependencies.requirements_file().read_text(encoding="utf-8")
    lines = [line.split(">")[0].split("=")[0].strip() for line in text.splitlines()
             if line.strip() and not line.startswith("#")]
    assert sorted(lines) == sorted(dependencies.OTHERS.values())
    assert dependencies.missing() == []  # this environment has everything


def test_the_model_choice_offers_every_registry_model():
    from SegmentWithSAMLib.models import registry

    combo = next(w for w in UI.iter("widget") if w.get("name") == "modelComboBox")
    items = {i.find("property/string").text for i in combo.iter("item")}
    assert items == set(registry())
