"""The Slicer side of SegmentWithSAM without Qt: MRML ⇄ core conversions (:mod:`.mrml`), the module's logic
(:mod:`.logic`) and the dependency check (:mod:`.dependencies`). Tested against ``slicer-core``."""
