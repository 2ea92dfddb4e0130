"""CTest entry for the in-app self-test: the module's SegmentWithSAMTest (panel, then the whole workflow of
SegmentWithSAMSlicerLib/selftest.py) inside a running Slicer."""

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class SegmentWithSAMWorkflowTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.util.selectModule("SegmentWithSAM")
        from SegmentWithSAM import SegmentWithSAMTest

        SegmentWithSAMTest().runTest()
