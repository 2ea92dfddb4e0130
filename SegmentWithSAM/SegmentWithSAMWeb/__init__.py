"""SegmentWithSAM in a web browser: Slicer's own slice views, markups and segmentations through trame-slicer,
rendered on the server (the optional extra ``pip install segmentwithsam[web]``; ``segmentwithsam web``).

Nothing is imported here: the command line imports :mod:`.app` only when the web app is asked for.
"""
