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
SOURCE = (MODULE / "SegmentWithSAM.py").read_text()
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
    text = (MODULE / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui|txt|json|nii\.gz))\s*$", text, re.M))
    listed = {name.replace("${MODULE_NAME}", "SegmentWithSAM") for name in listed}
    present = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "Lib" in p.parts[len(MODULE.parts)]}
    assert present <= listed, sorted(present - listed)
    assert all((MODULE / name).is_file() for name in listed), [n for n in listed if not (MODULE / n).is_file()]


def test_extension_descriptions_declare_the_pytorch_dependency():
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "SlicerExtension.s4ext").read_text().splitlines()
                 if line and not line.startswith("#"))
    for key in ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "category",
                "iconurl", "description", "screenshoturls", "enabled"):
        assert s4ext.get(key), key
    assert s4ext["depends"] == "PyTorch"
    catalog = json.loads((ROOT / "SegmentWithSAM.json").read_text())
    assert catalog["build_dependencies"] == ["PyTorch"] and catalog["category"] == "Segmentation"
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in (ROOT / "CMakeLists.txt").read_text()
    assert (ROOT / "Resources" / "Icons" / "SegmentWithSAM.png").is_file()


def test_requirements_file_installs_what_the_dependency_check_looks_for():
    text = dependencies.requirements_file().read_text()
    lines = [line.split(">")[0].split("=")[0].strip() for line in text.splitlines()
             if line.strip() and not line.startswith("#")]
    assert sorted(lines) == sorted(dependencies.OTHERS.values())
    assert dependencies.missing() == []  # this environment has everything


def test_the_model_choice_offers_every_registry_model():
    from SegmentWithSAMLib.models import registry

    combo = next(w for w in UI.iter("widget") if w.get("name") == "modelComboBox")
    items = {i.find("property/string").text for i in combo.iter("item")}
    assert items == set(registry())
