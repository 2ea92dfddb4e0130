"""CTest entry for the in-app self-test: the module's SegmentWithSAMTest (panel, then the whole workflow of
SegmentWithSAMSlicerLib/selftest.py) inside a running Slicer."""

import slicer
from slicer import ScriptedLoadableModule  # the module, not its test class: unittest collects this file's classes


class SegmentWithSAMWorkflowTest(ScriptedLoadableModule.ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.util.selectModule("SegmentWithSAM")
        from SegmentWithSAM import SegmentWithSAMTest

        SegmentWithSAMTest().runTest()
