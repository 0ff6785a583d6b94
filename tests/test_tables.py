"""Every user CSV the tools read is refused in one line naming the file, however it is broken."""

from __future__ import annotations

import gzip

import pytest

from cxrfusion.data.nih import read_table
from cxrfusion.errors import CxrError
from cxrfusion.evaluation.expert_labels import read_expert_labels
from cxrfusion.evaluation.localisation import read_boxes

READERS = [read_table, read_expert_labels, read_boxes]


def _truncated_gz(path):
    data = gzip.compress(b"Image Index,Finding Label,x,y,w,h\n" + b"a.png,Mass,1,2,3,4\n" * 500)
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.__name__)
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (_truncated_gz, "not a readable CSV"),
        (lambda p: p.write_bytes(b'"unclosed\n' * 3 + b"\xff\xfe\x00"), "not a readable CSV"),
    ],
    ids=["missing", "empty", "truncated-gz", "garbage"],
)
def test_a_broken_table_is_one_user_error_naming_it(reader, make, message, tmp_path):
    path = tmp_path / "table.csv.gz"
    make(path)
    with pytest.raises(CxrError, match=rf"table\.csv\.gz: .*{message}") as error:
        reader(path)
    assert "\n" not in str(error.value)
