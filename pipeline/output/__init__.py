"""Output: the row contract and how rows reach storage.

``schema`` (one row per input image, COCO-RLE masks, the columns downstream code reads) and
``sink`` (workers write a unit's part files under names derived from the unit; the driver writes the
unit's commit marker last; the output layout and its listing for resume).
"""
