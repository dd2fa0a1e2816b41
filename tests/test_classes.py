"""data/classes.py: labels.txt in both formats (one name per line, "<index><TAB><name>"), and its errors."""

import pytest

from data.classes import COCO_CLASSES, VOC_CLASSES, read_class_names


def test_one_name_per_line(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("background\ntraffic light\n\n  potted plant  \n")
    assert read_class_names(p) == ("background", "traffic light", "potted plant")


@pytest.mark.parametrize("sep", ["\t", " ", "  "])
def test_indexed_lines(tmp_path, sep):
    p = tmp_path / "labels.txt"
    p.write_text("".join(f"{i}{sep}{n}\n" for i, n in enumerate(COCO_CLASSES)))
    assert read_class_names(p) == COCO_CLASSES  # names with spaces ("fire hydrant") survive


def test_round_trip_of_both_writers(tmp_path):
    for text in ("".join(f"{n}\n" for n in VOC_CLASSES), "".join(f"{i}\t{n}\n" for i, n in enumerate(VOC_CLASSES))):
        (tmp_path / "l.txt").write_text(text)
        assert read_class_names(tmp_path / "l.txt") == VOC_CLASSES


def test_absent_file_gives_voc(tmp_path):
    assert read_class_names(tmp_path / "none.txt") == VOC_CLASSES


@pytest.mark.parametrize(
    "text, message",
    [
        ("0\tbackground\n2\tcat\n", r"l.txt:2: expected '1<TAB><name>'"),  # index out of order
        ("0\tbackground\n\n1\tcat\ndog\n", r"l.txt:4: expected '2<TAB><name>'"),  # format mixed, blank line counted
        ("1\tbackground\n2\tcat\n", r"l.txt:1: expected '0<TAB><name>'"),  # indices must start at 0
        ("background\ncat\ncat\n", r"l.txt:3: duplicate class name 'cat' \(first on line 2\)"),
        ("background\n", "at least one class name"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_class_names(tmp_path / "l.txt")
    assert "\n" not in str(info.value)
