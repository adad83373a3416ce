"""data.build_audio: MIDI fix, render watchdog, fluidsynth render, recordings conversion (fast; skips
what needs music21, mido, fluidsynth or a soundfont when they are absent)."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data import AudioFolder
from data import build_audio as ba

SF2 = Path(ba.DEFAULT_SOUNDFONT)
needs_fluidsynth = pytest.mark.skipif(shutil.which("fluidsynth") is None or not SF2.is_file(),
                                      reason="needs fluidsynth and fluid-soundfont-gm (apt-get install)")


def _two_parts_one_channel(mido):
    """Two tracks sharing channel 0, the second ending earlier with a note it never releases."""
    mid = mido.MidiFile(type=1, ticks_per_beat=480)
    conductor = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000, time=0)])
    a = mido.MidiTrack([mido.Message("program_change", channel=0, program=0, time=0),
                        mido.Message("note_on", channel=0, note=60, velocity=80, time=0),
                        mido.Message("note_off", channel=0, note=60, velocity=0, time=1920)])
    b = mido.MidiTrack([mido.Message("note_on", channel=0, note=64, velocity=80, time=0)])  # stuck
    mid.tracks.extend([conductor, a, b])
    return mid


def _cc_at_end(track) -> set[tuple[int, int]]:
    """(channel, control) of the control changes after the track's last note event."""
    last_note = max(i for i, m in enumerate(track) if m.type in ("note_on", "note_off")) if any(
        m.type in ("note_on", "note_off") for m in track) else -1
    return {(m.channel, m.control) for m in track[last_note + 1:] if m.type == "control_change"}


def test_fix_midi_separate_channels_and_all_notes_off():
    mido = pytest.importorskip("mido")
    fixed = ba.fix_midi(_two_parts_one_channel(mido), [40, 42])
    assert len(fixed.tracks) == 3
    want = {(ch, cc) for ch in range(16) for cc in (123, 120)}
    end_ticks = set()
    for track in fixed.tracks:
        assert want <= _cc_at_end(track), "CC123 and CC120 on all 16 channels at the end of every track"
        assert track[-1].type == "end_of_track"
        end_ticks.add(sum(m.time for m in track))
    assert len(end_ticks) == 1, "all tracks end together (a short part must not cut the others)"
    assert end_ticks.pop() == 1920 + ba.TAIL_BEATS * 480
    notes = [{m.channel for m in t if m.type == "note_on"} for t in fixed.tracks[1:]]
    assert notes == [{0}, {1}], "each part on its own channel"
    programs = [[(m.channel, m.program) for m in t if m.type == "program_change"] for t in fixed.tracks[1:]]
    assert programs == [[(0, 40)], [(1, 42)]]
    roundtrip = mido.MidiFile(file=__import__("io").BytesIO(_bytes(fixed)))
    assert abs(roundtrip.length - (4 * 0.5 + 2 * 0.5)) < 1e-6


def _bytes(mid) -> bytes:
    import io

    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


def test_watchdog_kills_runaway_and_leaves_no_file(tmp_path):
    out = tmp_path / "out.wav"
    forever = f"f = open({str(out)!r}, 'wb')\nwhile True:\n    f.write(b'x' * 65536); f.flush()"
    with pytest.raises(ba.RenderError) as e:
        ba.run_watched([sys.executable, "-c", forever], out, timeout_s=30, max_bytes=2_000_000)
    assert e.value.kind == "runaway"
    assert not out.exists()


def test_watchdog_timeout_and_failure(tmp_path):
    out = tmp_path / "out.wav"
    with pytest.raises(ba.RenderError) as e:
        ba.run_watched([sys.executable, "-c", "import time; time.sleep(60)"], out, timeout_s=0.5, max_bytes=10**9)
    assert e.value.kind == "timeout"
    with pytest.raises(ba.RenderError) as e:
        ba.run_watched([sys.executable, "-c", f"open({str(out)!r}, 'w').write('x'); raise SystemExit(3)"], out,
                       timeout_s=30, max_bytes=10**9)
    assert e.value.kind == "fluidsynth" and "exit status 3" in str(e.value)
    assert not out.exists()


def test_render_limits_grow_with_length():
    t1, b1 = ba.render_limits(10)
    t2, b2 = ba.render_limits(1000)
    assert t2 > t1 and b2 > b1 > 2 * 10 * ba.RENDER_RATE * 4


def test_polish_normalises_and_trims():
    sr = ba.SAMPLE_RATE
    x = np.zeros(4 * sr, np.float32)
    x[sr: 3 * sr] = 0.1 * np.sin(np.arange(2 * sr) * 0.1)
    y = ba.polish(x)
    assert abs(np.abs(y).max() - ba.PEAK) < 1e-4
    assert abs(len(y) / sr - 2 - 2 * ba.EDGE_SECONDS) < 0.01
    assert len(ba.polish(np.zeros(100, np.float32))) == 0


def test_dedupe_and_round_robin():
    root = Path("/c")
    works = [ba.work_of(root / p, root) for p in ("bach/bwv1.krn", "bach/bwv1.mxl", "bach/bwv2-lz.mxl",
                                                  "bach/bwv2-w.mxl", "beethoven/op18/movement1.mxl")]
    bach = ba.dedupe([w for w in works if w.composer == "bach"])
    assert [w.source for w in bach] == ["bach/bwv1.mxl", "bach/bwv2-w.mxl"]
    beet = ba.dedupe([w for w in works if w.composer == "beethoven"])
    assert beet[0].id == "beethoven/op18_movement1"
    assert [w.composer for w in ba.round_robin([bach, beet])] == ["bach", "beethoven", "bach"]
    assert ba.composer_folders(["schumann", "bach"]) == ["schumann_robert", "schumann_clara", "bach"]


def _tiny_score_file(tmp_path: Path) -> Path:
    """A 2-part score (violin and soprano, 8 quarter notes each, 120 bpm = 4 s) with a repeat, as MusicXML."""
    m21 = pytest.importorskip("music21")
    from music21 import bar, instrument, meter, note, stream, tempo

    score = stream.Score()
    for name, inst, pitch in (("Violin", instrument.Violin(), "E5"), ("Soprano", instrument.Soprano(), "C5")):
        part = stream.Part()
        part.partName = name
        part.insert(0, inst)
        for k in range(2):
            m = stream.Measure(number=k + 1)
            if k == 0:
                m.insert(0, meter.TimeSignature("4/4"))
                m.insert(0, tempo.MetronomeMark(number=120))
            for _ in range(4):
                m.append(note.Note(pitch, quarterLength=1))
            part.append(m)
        part.getElementsByClass(stream.Measure)[1].rightBarline = bar.Repeat(direction="end")
        score.insert(0, part)
    path = tmp_path / "piece.musicxml"
    score.write("musicxml", fp=str(path))
    assert m21 is not None
    return path


def test_convert_work_writes_fixed_midi(tmp_path):
    pytest.importorskip("mido")
    src = _tiny_score_file(tmp_path)
    work = ba.Work("test/piece", "test", src, "test/piece.musicxml")
    r = ba.convert_work(work, tmp_path / "midi")
    assert r["ok"], r
    (piece,) = r["pieces"]
    assert piece["repeats"] == "expanded"
    # 16 beats at 120 bpm (the repeat played twice), music21's one beat of padding, then the tail
    assert abs(piece["score_seconds"] - (16 + 1 + ba.TAIL_BEATS) * 0.5) < 0.05
    assert piece["programs"][0] == 40 and piece["programs"][1] in (ba.CHOIR, ba.ORGAN)
    import mido

    mid = mido.MidiFile(str(tmp_path / "midi" / piece["midi"]))
    want = {(ch, cc) for ch in range(16) for cc in (123, 120)}
    assert all(want <= _cc_at_end(t) for t in mid.tracks)
    assert len({m.channel for t in mid.tracks for m in t if m.type == "note_on"}) == 2
    assert not list((tmp_path / "midi").rglob(".*")), "no temporary files left"


def test_resolve_repeats_expands_and_drops_leftover_marks(tmp_path):
    pytest.importorskip("music21")
    from music21 import converter, repeat, stream

    score = converter.parse(str(_tiny_score_file(tmp_path)), forceSource=True)
    for part in score.parts:  # a Fine with no D.C. or D.S. to send the music back to it
        part.getElementsByClass(stream.Measure)[0].insert(3, repeat.Fine())
    assert ba.has_repeats(score)
    ready, how = ba.resolve_repeats(score)
    assert how == "expanded" and not ba.has_repeats(ready)
    assert ready.highestTime == 2 * score.highestTime
    plain = ba.strip_repeats(score)
    assert not ba.has_repeats(plain) and plain.highestTime == score.highestTime
    assert ba.has_repeats(score), "strip_repeats works on a copy"


def test_convert_work_reports_unparseable(tmp_path):
    pytest.importorskip("music21")
    bad = tmp_path / "bad.musicxml"
    bad.write_text("<score-partwise><oops")
    r = ba.convert_work(ba.Work("test/bad", "test", bad, "test/bad.musicxml"), tmp_path / "midi")
    assert not r["ok"] and r["kind"] == "parse"


@needs_fluidsynth
def test_render_piece_is_12k_mono_of_score_length(tmp_path):
    pytest.importorskip("mido")
    src = _tiny_score_file(tmp_path)
    r = ba.convert_work(ba.Work("test/piece", "test", src, "test/piece.musicxml"), tmp_path / "midi")
    (piece,) = r["pieces"]
    x, raw = ba.render_piece(piece, tmp_path / "midi", tmp_path / "tmp", SF2)
    # fluidsynth stops about 2 s after the last event (the all-sound-off), not never
    assert piece["score_seconds"] - 0.5 < raw < piece["score_seconds"] + 3, raw
    assert 7.0 < len(x) / ba.SAMPLE_RATE < piece["score_seconds"] + 0.5
    assert x.ndim == 1 and np.sqrt(np.mean(x ** 2)) > 0.01
    assert not list((tmp_path / "tmp").iterdir())
    ba.write_flac(tmp_path / "a.flac", x)
    info = sf.info(str(tmp_path / "a.flac"))
    assert (info.samplerate, info.channels, info.subtype) == (12000, 1, "PCM_16")


def test_recordings_to_12k_mono_flac(tmp_path):
    rec = tmp_path / "rec"
    (rec / "sub").mkdir(parents=True)
    t = np.arange(int(2.5 * 44100)) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)], axis=1)
    sf.write(str(rec / "sub" / "tone.wav"), stereo, 44100, subtype="PCM_16")
    sf.write(str(rec / "blip.wav"), stereo[:2000], 44100, subtype="PCM_16")  # under 1 s
    (rec / "notes.txt").write_text("not audio")
    out = tmp_path / "out"
    assert ba.main(["--out", str(out), "--composers", "none", "--recordings", str(rec)]) == 0
    flac = out / "audio" / "recordings" / "sub" / "tone.flac"
    info = sf.info(str(flac))
    assert (info.samplerate, info.channels, info.format) == (12000, 1, "FLAC")
    assert abs(info.duration - 2.5) < 0.05
    failures = json.loads((out / "failures.json").read_text())
    assert {v["kind"] for v in failures.values()} == {"unreadable", "too short"}
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["files"]
    assert entry["path"] == "recordings/sub/tone.flac" and entry["composer"] == "recordings"
    assert entry["split"] in ("train", "val")
    assert "recordings" in (out / "README.md").read_text()
    assert [p.name for p in (out / "audio").rglob("*") if p.is_file()] == ["tone.flac"]
    mtime = flac.stat().st_mtime_ns
    assert ba.main(["--out", str(out), "--composers", "none", "--recordings", str(rec)]) == 0  # resumes
    assert flac.stat().st_mtime_ns == mtime
    assert len(json.loads((out / "manifest.json").read_text())["runs"]) == 2
    ds = AudioFolder(out / "audio", split=entry["split"], seq_len=1024, val_fraction=0.05)
    assert len(ds) == int(info.duration * 12000) // 1024
