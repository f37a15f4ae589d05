"""TensorBoard event files: the framing's CRC-32C, the Event protos (decoded with the protobuf library), and
the training loop's per-variant runs equal to metrics.jsonl."""
import json
import math

import numpy as np
import pytest

from tb_proto import events, scalars
from jaxpoison.train import tblog


def test_crc32c_matches_published_check_values():
    # the CRC catalogue's check value and the iSCSI vectors of RFC 3720 B.4
    assert tblog.crc32c(b"123456789") == 0xE3069283
    assert tblog.crc32c(bytes(32)) == 0x8A9136AA
    assert tblog.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tblog.crc32c(bytes(range(32))) == 0x46DD794E


def test_event_file_decodes_with_protobuf(tmp_path):
    w = tblog.EventWriter(tmp_path / "run")
    w.add([(0, {"loss": 2.5, "lr": 1e-4}), (7, {"loss": 1.25, "bad": float("nan")}), (300, {"loss": -3.0})],
          wall_time=1234.5)
    (f,) = (tmp_path / "run").glob("events.out.tfevents.*")
    evs = events(f)
    assert evs[0].file_version == "brain.Event:2"
    assert [e.step for e in evs[1:]] == [0, 7, 300] and all(e.wall_time == 1234.5 for e in evs[1:])
    assert {v.tag: v.simple_value for v in evs[1].summary.value} == {"loss": 2.5, "lr": pytest.approx(1e-4)}
    assert [v.tag for v in evs[2].summary.value] == ["loss"]          # the NaN is left out, not written
    assert evs[3].summary.value[0].simple_value == -3.0


def test_damaged_event_file_is_reported(tmp_path):
    w = tblog.EventWriter(tmp_path)
    w.add([(1, {"loss": 1.0})])
    data = bytearray(w.path.read_bytes())
    data[-6] ^= 0xFF
    w.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad payload checksum"):
        list(tblog.read_records(w.path))
    w.path.write_bytes(bytes(data[:-3]))
    with pytest.raises(ValueError, match="truncated"):
        list(tblog.read_records(w.path))


def test_training_writes_one_tensorboard_run_per_variant(tmp_path):
    from resume_job import ST
    from tiny import tiny_base, tiny_study
    from jaxpoison.train.trainer import train_study

    sd = tiny_study(V=3)
    for k, t in enumerate(sd.table):
        t["name"] = f"cell {k}/a"
    train_study(tiny_base(), ST, sd, run_dir=str(tmp_path), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    runs = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    assert runs == ["000-cell-0-a", "001-cell-1-a", "002-cell-2-a", "study"]
    for k in range(3):
        got = scalars(tmp_path / "tensorboard" / runs[k])
        for m in ("loss", "grad_norm", "lr"):
            want = {r["step"]: r[m][k] for r in rows if not math.isnan(r[m][k])}
            assert set(got[m]) == set(want)
            assert all(got[m][s] == np.float32(want[s]) for s in want)
    tok = scalars(tmp_path / "tensorboard" / "study")["tokens_per_s"]
    assert sorted(tok) == [r["step"] for r in rows] and min(tok.values()) > 0


def test_resume_ignores_the_tensorboard_switch_but_not_training_fields():
    import dataclasses

    from jaxpoison.train.config import TrainConfig
    from jaxpoison.train.trainer import _same_run

    def meta(tc):
        return json.loads(json.dumps({"train": dataclasses.asdict(tc)}, default=str))
    old = meta(TrainConfig())
    del old["train"]["tensorboard"]                       # saved before the field existed
    assert _same_run(old, meta(TrainConfig(tensorboard=False))) == []
    assert _same_run(meta(TrainConfig()), meta(TrainConfig(tensorboard=False))) == []
    assert _same_run(old, meta(TrainConfig(learning_rate=1e-3))) == ["train"]


@pytest.mark.parametrize("variant_chunk", [0, 2])
def test_segment_throughput_counts_the_segments_own_time(tmp_path, variant_chunk):
    """``segment_tok_s`` = a segment's tokens over the time it took: the segments' times (tokens / tok_s) add up
    to the training's wall time, not less. Chunked variants run synchronously inside the call, so a clock read
    after the call would leave the segment almost no time (a tok/s of millions)."""
    import dataclasses

    from resume_job import ST
    from tiny import tiny_base, tiny_study
    from jaxpoison.train.trainer import train_study

    st = dataclasses.replace(ST, tcfg=dataclasses.replace(ST.tcfg, variant_chunk=variant_chunk, save_every=0))
    res = train_study(tiny_base(), st, tiny_study(V=3), run_dir=str(tmp_path), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # each step's row carries its segment's figure, so a segment's time is the sum of its rows' tokens / tok_s
    total = sum(float(np.sum(r["tokens"])) / r["segment_tok_s"] for r in rows)
    assert 0.5 * res.seconds <= total <= 1.01 * res.seconds, (total, res.seconds)
