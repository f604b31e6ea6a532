"""ddpm_fast.losslog: loss.csv kept in step with the checkpoint a run resumes from."""

import pytest

from ddpm_fast.losslog import LOG_HEADER, LossLog


@pytest.mark.parametrize(
    "text",
    ["", "\n", "step,epoch,loss,lr\n", "step,epoch,loss,lr\n1,0,0.5,1e-4\n\n2,0,0.4,1e-4\n\n5,1,0.3,1e-4\n",
     "1,0,0.5,1e-4\n2,0,0.4,1e-4\n3,0,0.2", "step,epoch,loss,lr\r\n1,0,0.5,1e-4\r\n2,0,0.4,1e-4\r\n4,0,0.4"],
    ids=["empty", "blank", "header", "blank-lines", "no-header-torn", "crlf-torn"],
)  # fmt: skip
def test_resume_trims_any_log_to_the_checkpoints_step(tmp_path, text):
    """--resume keeps loss.csv's rows up to the checkpoint's step. Blank lines (an editor's), a
    torn last line (a crash mid-write), a missing header or an empty file crashed it (IndexError);
    now they are dropped or the header put back, and the next rows append after it."""
    log = tmp_path / "loss.csv"
    log.write_text(text)
    run = LossLog(str(log), log_every=1)
    run.trim(2)
    rows = [r.split(",") for r in log.read_text().splitlines()]
    expected = [["1", "0", "0.5", "1e-4"], ["2", "0", "0.4", "1e-4"]] if "0.4" in text else []
    assert rows == [LOG_HEADER, *expected]
    run.rows.append([3, 0, 0.1, 1e-4])
    run.flush()
    assert log.read_text().splitlines()[-1] == "3,0,0.1,0.0001" and len(log.read_text().splitlines()) == len(rows) + 1
