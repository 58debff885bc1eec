"""ASAP XML annotations as in CAMELYON16: one polygon per lesion, in level-0 px, all in group '_0'."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np


def asap_xml(polygons: Sequence[np.ndarray]) -> bytes:
    """The XML document for `polygons` ((n, 2) arrays of x, y) as bytes."""
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    for i, poly in enumerate(polygons):
        ann = ET.SubElement(
            annotations, "Annotation",
            Name=f"Annotation {i}", Type="Polygon", PartOfGroup="_0", Color="#F4FA58",
        )  # fmt: skip
        coords = ET.SubElement(ann, "Coordinates")
        for order, (x, y) in enumerate(np.asarray(poly, dtype=float)):
            ET.SubElement(coords, "Coordinate", Order=str(order), X=f"{x:.2f}", Y=f"{y:.2f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    group = ET.SubElement(groups, "Group", Name="_0", PartOfGroup="None", Color="#FF0000")
    ET.SubElement(group, "Attributes")
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
