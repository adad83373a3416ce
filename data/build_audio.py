"""Build a real-music training set: music21 corpus -> MIDI -> fluidsynth -> 12 kHz mono FLAC.

    python -m data.build_audio --out /work/datasets/audio12k            # the common-practice subset
    python -m data.build_audio --out OUT --composers bach,palestrina --workers 2 --max-pieces 50
    python -m data.build_audio --out OUT --composers none --recordings ~/Music   # only real recordings

Stages (each resumable: outputs that exist are kept, failures recorded in OUT/failures.json are
skipped unless ``--retry-failed``):

1. Each score of music21's corpus (one work = one file; .rntxt analyses skipped, duplicate encodings
   of a work dropped) -> OUT/midi/<composer>/<work>.mid. Repeats are expanded (or removed when the
   expansion fails, lengthens the score more than 3x, or leaves the parts unequal). Each part gets
   its own MIDI channel and one GM program: its named instrument, or, for voices, choir or church
   organ (picked per work), which would otherwise come out on piano. Every track ends with
   all-notes-off and all-sound-off (CC123, CC120) on all 16 channels, so no note can stay stuck.
2. Each MIDI -> ``fluidsynth -ni -F tmp.wav -r 24000 SF2 in.mid``, bounded in time and in size
   (killed when the wav grows past twice the score's length plus a margin), then mono, 12 kHz,
   peak-normalised to -1 dBFS, leading/trailing silence trimmed -> OUT/audio/<composer>/<work>.flac
   (16-bit; written to a hidden temporary name, then renamed). Pieces under 1 s are skipped.
3. ``--recordings DIR``: every file soundfile reads under DIR goes the same mono / 12 kHz path into
   OUT/audio/recordings/.

OUT/audio is what ``data.audio_folder.AudioFolder(OUT / "audio", split=...)`` reads; it splits
train/validation by a stable hash of each file's relative path, i.e. by piece. OUT/manifest.json
lists every file (composer, seconds, source) and OUT/README.md describes the build.

music21 and mido are needed only here: ``pip install -r requirements-data.txt``; fluidsynth and a
General MIDI soundfont come from Debian (``apt-get install fluidsynth fluid-soundfont-gm``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from media.audio import SAMPLE_RATE, load_audio

from .files import list_files
from .loader import DESCRIPTION
from .splits import hash_split

logger = logging.getLogger("data.build_audio")

DEFAULT_COMPOSERS = ("bach", "beethoven", "mozart", "haydn", "schumann", "handel", "corelli", "schubert",
                     "chopin", "cpebach", "weber", "verdi", "monteverdi")
COMPOSER_ALIASES = {"schumann": ("schumann_robert", "schumann_clara")}
SCORE_SUFFIXES = (".mxl", ".musicxml", ".xml", ".krn", ".abc")  # preferred first; .rntxt (analyses) skipped
DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
RENDER_RATE = 24000  # fluidsynth renders here (stereo 16-bit), then mono and SAMPLE_RATE
MAX_REPEAT_GROWTH = 3.0  # expanded / written length above this -> repeats removed instead
TAIL_BEATS = 2  # the CC123/CC120 come this long after the last event, so the last notes ring out
PIANO, ORGAN, CELLO, CHOIR = 0, 19, 42, 52  # General MIDI programs (0-based)
PEAK = 10 ** (-1 / 20)  # -1 dBFS
SILENCE = 1e-3  # -60 dB below the peak: trimmed at both ends
EDGE_SECONDS = 0.05  # kept around the trimmed music
MIN_SECONDS = 1.0
PARSE_TIMEOUT_S = 600

VOCAL_RE = re.compile(r"sopr|\balt|tenor|bass|cant[ou]|quint|sext|septim|voice|voce|vox|chor|coro|discant|"
                      r"superius|bariton|mezzo|^[satb]\.?$", re.I)
CONTINUO_RE = re.compile(r"continuo|b\.\s*c\.", re.I)

KNOWN_LICENCES = {  # soundfont file name -> licence (from its Debian copyright file)
    "FluidR3_GM.sf2": "MIT (Frank Wen, Toby Smithe); /usr/share/doc/fluid-soundfont-gm/copyright",
}


# ---------------------------------------------------------------- small helpers


def read_json(path: Path, default: object) -> object:
    """The JSON in ``path``, or ``default`` when the file does not exist."""
    return json.loads(path.read_text()) if path.is_file() else default


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically (hidden temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def stable_pick(key: str, n: int) -> int:
    """A number in [0, n) fixed by ``key`` (same on every run and machine)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % n


def write_flac(path: Path, x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float samples as 16-bit FLAC atomically: never a half-written file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        sf.write(str(tmp), x, sample_rate, format="FLAC", subtype="PCM_16")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- stage 1: corpus -> MIDI


@dataclass(frozen=True)
class Work:
    """One score file of the corpus: id "composer/name", the corpus folder it came from, its path."""

    id: str
    composer: str
    path: Path
    source: str  # path relative to the corpus root


def corpus_root() -> Path:
    """music21's corpus folder."""
    import music21.corpus

    return Path(music21.corpus.__file__).parent


def composer_folders(names: Iterable[str]) -> list[str]:
    """Corpus folders for composer names ("schumann" -> schumann_robert, schumann_clara)."""
    out: list[str] = []
    for name in names:
        for folder in COMPOSER_ALIASES.get(name, (name,)):
            if folder not in out:
                out.append(folder)
    return out


def work_of(path: Path, root: Path) -> Work:
    """The Work for a corpus file: beethoven/opus18no1/movement1.mxl -> id beethoven/opus18no1_movement1."""
    rel = path.relative_to(root)
    composer = rel.parts[0]
    name = "_".join(rel.with_suffix("").parts[1:]) or rel.stem
    return Work(f"{composer}/{name}", composer, path, rel.as_posix())


def dedupe(works: list[Work]) -> list[Work]:
    """One encoding per work: .krn/.mxl twins and variants (bwv18.5-lz / bwv18.5-w, *_old) collapse,
    keeping the preferred format, then the shortest name."""
    def base(w: Work) -> str:
        return re.sub(r"(-[A-Za-z0-9]+|_old)$", "", w.id)

    def rank(w: Work) -> tuple:
        return base(w), SCORE_SUFFIXES.index(w.path.suffix.lower()), len(w.id), w.id

    kept: dict[str, Work] = {}
    for w in sorted(works, key=rank):
        kept.setdefault(base(w), w)
    return sorted(kept.values(), key=lambda w: w.id)


def round_robin(groups: Sequence[list[Work]]) -> list[Work]:
    """Interleave the composers' lists (one of each in turn), so any prefix is varied."""
    out: list[Work] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def find_works(composers: Sequence[str]) -> list[Work]:
    """Score files of the corpus for these composers, deduplicated, composers interleaved."""
    from music21 import corpus

    root = corpus_root()
    groups = []
    for folder in composer_folders(composers):
        paths = [Path(p) for p in corpus.getComposer(folder) if Path(p).suffix.lower() in SCORE_SUFFIXES]
        if not paths:
            logger.warning("no scores for composer %r in music21's corpus (folders: %s)", folder,
                           ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != "_")))
        groups.append(dedupe([work_of(p, root) for p in paths]))
    return round_robin(groups)


def part_program(part, vocal: int) -> tuple[int | None, bool]:
    """(GM program, is a voice) for a music21 part; program None when nothing names an instrument.

    The part's name wins over its instrument object (scores often carry a placeholder piano);
    voices get ``vocal`` (choir or organ) instead of music21's "voice oohs"/piano.
    """
    from music21 import instrument

    inst = part.getInstrument(returnDefault=False)
    names = [n for n in (part.partName, getattr(inst, "partName", None), getattr(inst, "instrumentName", None)) if n]
    for name in names:
        if CONTINUO_RE.search(name):
            return CELLO, False
        try:
            guess = instrument.fromString(name)
        except Exception:  # music21 raises InstrumentException (and others) for unknown names
            guess = None
        if isinstance(guess, instrument.Vocalist) or (guess is None and VOCAL_RE.search(name)):
            return vocal, True
        if guess is not None and type(guess) is not instrument.Instrument and guess.midiProgram is not None:
            return int(guess.midiProgram), False
    if isinstance(inst, instrument.Vocalist):
        return vocal, True
    if inst is not None and type(inst) is not instrument.Instrument and inst.midiProgram is not None:
        return int(inst.midiProgram), False
    return None, False


def part_programs(score, work_id: str) -> list[int]:
    """GM program of each part; unnamed parts follow the majority (voices or piano)."""
    vocal = (CHOIR, ORGAN)[stable_pick(work_id, 2)]
    found = [part_program(p, vocal) for p in score.parts]
    voices = sum(v for _, v in found)
    named = sum(p is not None for p, _ in found)
    default = vocal if named and voices * 2 >= named else PIANO
    return [default if p is None else p for p, _ in found]


def has_repeats(score) -> bool:
    """Repeat barlines, volta brackets, or D.C./D.S./Fine/Coda marks anywhere in the score."""
    from music21 import bar, repeat, spanner

    for el in score.recurse():
        if isinstance(el, (bar.Repeat, repeat.RepeatExpression, spanner.RepeatBracket)):
            return True
    return any(isinstance(s, spanner.RepeatBracket) for s in score.spannerBundle)


def strip_repeats(score):
    """A copy of the score with all repeat marks removed (played straight through, both endings)."""
    from music21 import bar, stream

    s = score.coreCopyAsDerivation("strip_repeats")
    for m in s.recurse().getElementsByClass(stream.Measure):
        if isinstance(m.leftBarline, bar.Repeat):
            m.leftBarline = bar.Barline("regular")
        if isinstance(m.rightBarline, bar.Repeat):
            m.rightBarline = bar.Barline("regular")
    for sub in [s, *s.recurse(streamsOnly=True)]:
        sub.removeByClass(["RepeatExpression", "RepeatBracket"])
    return s


def resolve_repeats(score) -> tuple[object, str]:
    """(score ready for MIDI, how): repeats "expanded", "stripped" (expansion failed or blew up), or "none"."""
    if not has_repeats(score):
        return score, "none"
    try:
        expanded = score.expandRepeats()
        growth = expanded.highestTime / max(score.highestTime, 1e-9)
        ends = {round(p.highestTime, 3) for p in expanded.parts}
        if growth <= MAX_REPEAT_GROWTH and len(ends) <= 1:  # leftovers (a Fine without D.C.) go too
            return (strip_repeats(expanded) if has_repeats(expanded) else expanded), "expanded"
        logger.debug("repeats removed: expansion grows %.1fx, part ends %s", growth, sorted(ends))
    except Exception as e:  # music21's ExpanderException and friends on malformed repeats
        logger.debug("repeats removed: expandRepeats failed: %s", e)
    return strip_repeats(score), "stripped"


def score_to_midi(score):
    """music21 Score -> mido.MidiFile (music21 writes one conductor track, then one track per part)."""
    import mido
    from music21.midi.translate import streamToMidiFile

    return mido.MidiFile(file=io.BytesIO(streamToMidiFile(score).writestr()))


def fix_midi(mid, programs: Sequence[int]):
    """Give each part its own channel (9, drums, skipped) and one program; end every track with
    CC123 (all notes off) and CC120 (all sound off) on all 16 channels, TAIL_BEATS after the song's end.

    ``programs`` belongs to the tracks after the first (conductor) track, in order; a count mismatch
    falls back to the programs in order, then piano. Returns a new mido.MidiFile.
    """
    import mido

    absolute = []  # per track: [(absolute tick, message)]
    for track in mid.tracks:
        t, events = 0, []
        for msg in track:
            t += msg.time
            if msg.type != "end_of_track":
                events.append((t, msg))
        absolute.append((t, events))
    end = max((t for t, _ in absolute), default=0) + TAIL_BEATS * mid.ticks_per_beat
    channels = [c for c in range(16) if c != 9]
    out = mido.MidiFile(type=1, ticks_per_beat=mid.ticks_per_beat)
    by_track = len(mid.tracks) - 1 == len(programs)  # the usual case: one track per part
    part = 0
    for k, (_, events) in enumerate(absolute):
        notes = [m for _, m in events if m.type == "note_on"]
        if notes and k > 0:
            drums = all(m.channel == 9 for m in notes)
            channel = 9 if drums else channels[part % len(channels)]
            i = k - 1 if by_track else part
            program = programs[i] if i < len(programs) else PIANO
            events = [(t, m.copy(channel=channel) if hasattr(m, "channel") else m)
                      for t, m in events if m.type != "program_change"]
            if not drums:
                events.insert(0, (0, mido.Message("program_change", channel=channel, program=program)))
            part += 1
        events = sorted(events, key=lambda e: e[0])  # stable: same-tick order kept
        for ch in range(16):
            events.append((end, mido.Message("control_change", channel=ch, control=123, value=0)))
            events.append((end, mido.Message("control_change", channel=ch, control=120, value=0)))
        track, last = mido.MidiTrack(), 0
        for t, m in events:
            track.append(m.copy(time=t - last))
            last = t
        track.append(mido.MetaMessage("end_of_track", time=0))
        out.tracks.append(track)
    return out


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def scores_of(parsed) -> list:
    """A parsed file as a list of Scores (an Opus holds several; a lone Part becomes a Score)."""
    from music21 import stream

    if isinstance(parsed, stream.Opus):
        return list(parsed.scores)
    if isinstance(parsed, stream.Score):
        return [parsed]
    score = stream.Score()
    score.insert(0, parsed)
    return [score]


def convert_work(work: Work, midi_dir: Path, timeout_s: int = PARSE_TIMEOUT_S) -> dict:
    """Parse one corpus file and write its MIDI file(s) atomically (worker process; SIGALRM bounds the time).

    Returns {"id", "ok", "error", "kind", "pieces": [{"id", "midi", "score_seconds", "programs",
    "repeats", "rights"}]}; an Opus gives one piece per score (ids "<work>-<k>").
    """
    from music21 import converter

    warnings.simplefilter("ignore")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(timeout_s)))
    stage = "parse"
    try:
        scores = scores_of(converter.parse(str(work.path), forceSource=True))
        pieces = []
        for k, score in enumerate(scores):
            pid = work.id if len(scores) == 1 else f"{work.id}-{k + 1}"
            stage = "write"
            if not any(True for _ in score.recurse().notes):
                continue
            programs = part_programs(score, pid)
            ready, how = resolve_repeats(score)
            try:
                mid = score_to_midi(ready)
            except Exception:
                if how == "stripped":
                    raise
                ready, how = strip_repeats(score), "stripped"
                mid = score_to_midi(ready)
            mid = fix_midi(mid, programs)
            path = midi_dir / f"{pid}.mid"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            mid.save(str(tmp))
            os.replace(tmp, path)
            rights = getattr(score.metadata, "copyright", None) if score.metadata is not None else None
            pieces.append({"id": pid, "midi": path.relative_to(midi_dir).as_posix(), "score_seconds": mid.length,
                           "programs": programs, "repeats": how, "rights": str(rights) if rights else None})
        if not pieces:
            return {"id": work.id, "ok": False, "kind": "no notes", "error": "the score has no notes"}
        return {"id": work.id, "ok": True, "pieces": pieces}
    except _Timeout:
        return {"id": work.id, "ok": False, "kind": "timeout", "error": f"{stage} took over {timeout_s} s"}
    except Exception as e:  # any music21 failure on one score must not stop the build
        return {"id": work.id, "ok": False, "kind": stage, "error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _convert_job(job: tuple[Work, str, int]) -> dict:
    work, midi_dir, timeout_s = job
    return convert_work(work, Path(midi_dir), timeout_s)


def build_midi(works: Sequence[Work], out: Path, state: State, workers: int, timeout_s: int,
               retry_failed: bool) -> None:
    """Stage 1: MIDI for every work not done yet (skipping recorded failures unless retry_failed)."""
    midi_dir = out / "midi"
    todo = []
    for w in works:
        done = state.index.get(w.id)
        if done and all((midi_dir / p["midi"]).is_file() for p in done["pieces"]):
            continue
        if state.failures.get(w.id, {}).get("stage") == "midi" and not retry_failed:
            continue
        todo.append(w)
    logger.info("stage 1: %d works, %d already converted or failed, %d to convert", len(works),
                len(works) - len(todo), len(todo))
    if not todo:
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    jobs = [(w, str(midi_dir), timeout_s) for w in todo]
    by_id = {w.id: w for w in todo}
    with ctx.Pool(max(1, workers), maxtasksperchild=25) as pool:
        for r in tqdm(pool.imap_unordered(_convert_job, jobs), total=len(jobs), desc="score -> MIDI",
                      mininterval=5, file=sys.stderr):
            work = by_id[r["id"]]
            if r["ok"]:
                state.index[work.id] = {"source": work.source, "composer": work.composer, "pieces": r["pieces"]}
                state.failures.pop(work.id, None)
            else:
                logger.warning("MIDI failed for %s (%s): %s", work.source, r["kind"], r["error"])
                state.failures[work.id] = {"stage": "midi", "kind": r["kind"], "error": r["error"],
                                           "source": work.source}
            state.save()


# ---------------------------------------------------------------- stage 2: MIDI -> audio


class RenderError(Exception):
    """A render that failed, ran past its time or grew past its size limit; ``kind`` says which."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def run_watched(cmd: Sequence[str], out_path: Path, timeout_s: float, max_bytes: int, poll_s: float = 0.1) -> None:
    """Run ``cmd`` (which writes ``out_path``); kill its process group when it runs past ``timeout_s``
    or ``out_path`` grows past ``max_bytes``. On any failure ``out_path`` is deleted and RenderError raised."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        problem = None
        try:
            while True:
                try:
                    proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                size = out_path.stat().st_size if out_path.exists() else 0
                if size > max_bytes:
                    problem = RenderError("runaway", f"output grew past {max_bytes:,} bytes (stuck note?)")
                elif time.monotonic() - start > timeout_s:
                    problem = RenderError("timeout", f"ran over {timeout_s:.0f} s")
                if problem:
                    break
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if problem is None and proc.returncode != 0:
            err.seek(0)
            tail = err.read()[-400:].decode(errors="replace").strip()
            problem = RenderError("fluidsynth", f"exit status {proc.returncode}: {tail}")
        if problem is None and not out_path.is_file():
            problem = RenderError("fluidsynth", "no output written")
    if problem is not None:
        out_path.unlink(missing_ok=True)
        raise problem


def render_limits(score_seconds: float, rate: int = RENDER_RATE) -> tuple[float, int]:
    """(timeout in s, size limit in bytes) for rendering a score of this length as stereo 16-bit."""
    expected = score_seconds * rate * 4
    return 120.0 + score_seconds / 4, int(2 * expected + 60 * rate * 4)


def render_midi(midi: Path, soundfont: Path, wav: Path, score_seconds: float) -> None:
    """fluidsynth renders ``midi`` to a stereo 16-bit RENDER_RATE wav, bounded in time and size."""
    timeout_s, max_bytes = render_limits(score_seconds)
    cmd = ["fluidsynth", "-ni", "-q", "-F", str(wav), "-T", "wav", "-r", str(RENDER_RATE), str(soundfont), str(midi)]
    run_watched(cmd, wav, timeout_s, max_bytes)


def polish(x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Peak-normalise mono float samples to -1 dBFS and trim leading/trailing silence (-60 dB)."""
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak <= 0:
        return x[:0]
    x = x * (PEAK / peak)
    loud = np.flatnonzero(np.abs(x) > SILENCE)
    edge = int(EDGE_SECONDS * sample_rate)
    return x[max(0, loud[0] - edge): loud[-1] + 1 + edge].astype(np.float32)


def to_dataset_audio(src: Path) -> np.ndarray:
    """Any file soundfile reads -> mono 12 kHz float32, normalised and trimmed (renders and recordings alike)."""
    return polish(load_audio(src, SAMPLE_RATE))


def render_piece(piece: dict, midi_dir: Path, tmp_dir: Path, soundfont: Path) -> tuple[np.ndarray, float]:
    """(dataset audio, seconds fluidsynth wrote) for one stage-1 piece."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(suffix=".wav", dir=tmp_dir)
    os.close(fd)
    wav = Path(name)
    try:
        wav.unlink()
        render_midi(midi_dir / piece["midi"], soundfont, wav, piece["score_seconds"])
        raw_seconds = sf.info(str(wav)).duration
        return to_dataset_audio(wav), raw_seconds
    finally:
        wav.unlink(missing_ok=True)


def render_all(works: Sequence[Work], out: Path, state: State, soundfonts: Sequence[Path], workers: int,
               retry_failed: bool) -> None:
    """Stage 2: render every converted piece whose FLAC does not exist yet."""
    midi_dir, audio_dir, tmp_dir = out / "midi", out / "audio", out / ".tmp"
    todo = []
    for w in works:
        for piece in state.index.get(w.id, {}).get("pieces", []):
            rel = f"{piece['id']}.flac"
            if (audio_dir / rel).is_file() or (piece["id"] in state.failures and not retry_failed):
                continue
            todo.append((w, piece, rel))
    logger.info("stage 2: %d pieces to render", len(todo))

    def one(job: tuple[Work, dict, str]) -> tuple[Work, dict, str, dict]:
        w, piece, rel = job
        sf2 = soundfonts[stable_pick(piece["id"], len(soundfonts))]
        try:
            x, raw = render_piece(piece, midi_dir, tmp_dir, sf2)
        except (RenderError, ValueError, OSError, RuntimeError) as e:
            return w, piece, rel, {"error": str(e), "kind": getattr(e, "kind", type(e).__name__)}
        seconds = len(x) / SAMPLE_RATE
        if seconds < MIN_SECONDS:
            return w, piece, rel, {"error": f"{seconds:.2f} s of sound after trimming", "kind": "too short"}
        if raw > piece["score_seconds"] + 30:
            logger.warning("%s: fluidsynth wrote %.0f s for a %.0f s score", rel, raw, piece["score_seconds"])
        write_flac(audio_dir / rel, x)
        return w, piece, rel, {"seconds": round(seconds, 3), "rendered_seconds": round(raw, 3),
                               "soundfont": sf2.name}

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for w, piece, rel, r in tqdm(pool.map(one, todo), total=len(todo), desc="MIDI -> audio", mininterval=5,
                                     file=sys.stderr):
            if "error" in r:
                logger.warning("render failed for %s (%s): %s", piece["id"], r["kind"], r["error"])
                state.failures[piece["id"]] = {"stage": "render", "kind": r["kind"], "error": r["error"],
                                               "source": w.source}
            else:
                state.failures.pop(piece["id"], None)
                state.files[rel] = {"path": rel, "composer": w.composer, "source": f"music21 corpus: {w.source}",
                                    "score_seconds": round(piece["score_seconds"], 3), "programs": piece["programs"],
                                    "repeats": piece["repeats"], "rights": piece.get("rights"), **r}
            state.save()


# ---------------------------------------------------------------- stage 3: real recordings


def convert_recordings(src: Path, out: Path, state: State, retry_failed: bool) -> None:
    """Every file soundfile reads under ``src`` -> OUT/audio/recordings/<relative path>.flac."""
    audio_dir = out / "audio"
    names = list_files(src)
    logger.info("recordings: %d files under %s", len(names), src)
    for name in tqdm(names, desc="recordings", mininterval=5, file=sys.stderr):
        rel = (Path("recordings") / name).with_suffix(".flac").as_posix()
        key = f"recordings/{name}"
        if (audio_dir / rel).is_file() or (key in state.failures and not retry_failed):
            continue
        try:
            x = to_dataset_audio(src / name)
        except ValueError as e:
            logger.warning("skipping recording %s: %s", src / name, e)
            state.failures[key] = {"stage": "recording", "kind": "unreadable", "error": str(e)[:500], "source": name}
            state.save()
            continue
        if len(x) < MIN_SECONDS * SAMPLE_RATE:
            state.failures[key] = {"stage": "recording", "kind": "too short", "source": name,
                                   "error": f"{len(x) / SAMPLE_RATE:.2f} s of sound after trimming"}
            state.save()
            continue
        write_flac(audio_dir / rel, x)
        state.failures.pop(key, None)
        state.files[rel] = {"path": rel, "composer": "recordings", "source": f"recording: {(src / name).resolve()}",
                            "seconds": round(len(x) / SAMPLE_RATE, 3)}
        state.save()


# ---------------------------------------------------------------- state, manifest, README


class State:
    """What the build knows, kept in OUT: midi/index.json (stage 1), failures.json, manifest.json."""

    def __init__(self, out: Path):
        self.out = out
        self.index: dict = read_json(out / "midi" / "index.json", {})
        self.failures: dict = read_json(out / "failures.json", {})
        manifest = read_json(out / "manifest.json", {})
        self.files: dict = {f["path"]: f for f in manifest.get("files", [])}
        self.runs: list = manifest.get("runs", [])

    def save(self) -> None:
        """Write the three JSON files atomically."""
        write_json(self.out / "midi" / "index.json", self.index)
        write_json(self.out / "failures.json", self.failures)
        write_json(self.out / "manifest.json", self.manifest())

    def reconcile(self) -> None:
        """Drop manifest entries whose file is gone; add entries (source unknown) for FLACs without one."""
        audio = self.out / "audio"
        present = set(list_files(audio)) if audio.is_dir() else set()
        self.files = {k: v for k, v in self.files.items() if k in present}
        for rel in sorted(present - set(self.files)):
            try:
                seconds = sf.info(str(audio / rel)).duration
            except RuntimeError:
                continue
            self.files[rel] = {"path": rel, "composer": rel.split("/")[0], "seconds": round(seconds, 3),
                               "source": "unknown (not recorded by the builder)"}

    def manifest(self) -> dict:
        """manifest.json: format, split rule, runs, and one entry per file (sorted by path)."""
        files = []
        for rel in sorted(self.files):
            f = dict(self.files[rel])
            f["split"] = hash_split(rel, 0.05, 0)
            files.append(f)
        return {"root": "audio", "sample_rate": SAMPLE_RATE, "format": "FLAC, 16-bit PCM, mono",
                "split": "data.splits.hash_split(path relative to audio/, val_fraction, seed); 'split' below is "
                         "for AudioFolder's defaults val_fraction=0.05, seed=0",
                "runs": self.runs, "files": files}


def soundfont_licence(path: Path) -> str:
    """Licence of a soundfont: known ones spelled out, else the Debian package's copyright file."""
    if path.name in KNOWN_LICENCES:
        return KNOWN_LICENCES[path.name]
    try:
        pkg = subprocess.run(["dpkg", "-S", str(path.resolve())], capture_output=True, text=True,
                             timeout=20).stdout.split(":")[0].strip()
    except (OSError, subprocess.SubprocessError):
        pkg = ""
    return f"see /usr/share/doc/{pkg}/copyright" if pkg else "unknown: check where the file came from"


def write_readme(out: Path, state: State, soundfonts: Sequence[Path]) -> None:
    """OUT/README.md: sources, hours per composer, counts, failures by reason, licences, split rule, commands."""
    hours: dict[str, float] = defaultdict(float)
    count: Counter = Counter()
    for f in state.files.values():
        hours[f["composer"]] += f["seconds"] / 3600
        count[f["composer"]] += 1
    n_pieces = sum(len(v["pieces"]) for v in state.index.values())
    by_stage = Counter(v["stage"] for v in state.failures.values())
    reasons = Counter((v["stage"], v["kind"]) for v in state.failures.values())
    repeats = Counter(p["repeats"] for v in state.index.values() for p in v["pieces"])
    used = sorted({f.get("soundfont") for f in state.files.values() if f.get("soundfont")})
    total_h = sum(hours.values())
    lines = [
        "# audio12k: real music as 12 kHz mono audio",
        "",
        "Built by `data/build_audio.py` (do not edit by hand; rerun the builder). Read it with",
        "`data.audio_folder.AudioFolder(\"<this folder>/audio\", split=\"train\" | \"val\")`.",
        "",
        "## Sources",
        "",
        "- Scores from music21's corpus (music21 " + _music21_version() + "), written as MIDI (OUT/midi/, cached),",
        "  each part on its own channel with its instrument's General MIDI program (voices: choir or church organ,",
        "  picked per work), repeats expanded (or removed when expansion fails or blows up), and CC123 + CC120 on",
        "  all 16 channels at the end of every track.",
        "- Rendered with fluidsynth at 24 kHz (stereo 16-bit), bounded in time and size, then mono, resampled to",
        "  12 kHz, peak-normalised to -1 dBFS, silence trimmed at both ends; pieces under 1 s dropped.",
        "- Soundfonts: " + "; ".join(f"`{p}` ({soundfont_licence(p)})" for p in soundfonts)
        + (f" (used: {', '.join(used)})" if used else ""),
        "- Real recordings, if any: audio/recordings/ (same mono / 12 kHz path).",
        "",
        f"## Contents: {total_h:.2f} h in {len(state.files)} files",
        "",
        "| composer | files | hours |",
        "|---|---:|---:|",
        *[f"| {c} | {count[c]} | {hours[c]:.2f} |" for c in sorted(hours, key=lambda c: -hours[c])],
        "",
        "## Counts",
        "",
        f"- works tried: {len(state.index) + by_stage['midi']}; converted to MIDI: {len(state.index)} "
        f"({n_pieces} pieces); MIDI failures: {by_stage['midi']}",
        f"- repeats: {dict(repeats)}",
        f"- pieces rendered: {sum(1 for f in state.files.values() if f['composer'] != 'recordings')}; "
        f"render failures: {by_stage['render']}; recordings converted: {count['recordings']}, "
        f"failed: {by_stage['recording']}",
        "- failures by reason: " + (", ".join(f"{s}/{k}: {n}" for (s, k), n in sorted(reasons.items())) or "none")
        + " (details in failures.json; rerun with --retry-failed to try them again)",
        "",
        "## Split",
        "",
        "AudioFolder assigns each file to train or val by a stable hash of its path relative to audio/",
        "(`data.splits.hash_split`, default val_fraction=0.05, seed=0). One file is one piece (a movement",
        "or a chorale), so the split is by piece; adding files moves no others. manifest.json lists the",
        "split of each file under those defaults.",
        "",
        "## Licences",
        "",
        "- music21 (software): BSD 3-Clause. Its corpus (`music21/corpus/license.txt`): encodings distributed",
        "  with the permission of the encoders (and, where needed, composers or arrangers) and where permitted",
        "  under US copyright law; some may not be used commercially; see the licences embedded in individual",
        "  compositions (the `rights` field of manifest.json where a score carries one).",
        "- Soundfont: as above. The rendered audio is derived from both.",
        "",
        "## Commands",
        "",
        *[f"- `{r['command']}` ({r['started']}, {r.get('seconds', '?')} s)" for r in state.runs],
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    composers = ", ".join(f"{c} {hours[c]:.2f} h" for c in sorted(hours, key=lambda c: -hours[c]))
    description = {
        "name": out.name, "builder": "python -m data.build_audio",
        "sources": f"music21 {_music21_version()} corpus scores ({composers}) rendered to 12 kHz mono with "
                   "fluidsynth and " + ", ".join(p.name for p in soundfonts),
        "licences": {"music21 corpus": "encodings distributed with the encoders' permission "
                                       "(music21/corpus/license.txt); some not for commercial use",
                     **{p.name: soundfont_licence(p) for p in soundfonts}},
        "hours": round(total_h, 2), "files": len(state.files)}
    write_json(out / DESCRIPTION, description)


def _music21_version() -> str:
    try:
        import music21

        return music21.__version__
    except ImportError:
        return "not installed"


# ---------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data.build_audio", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (audio/ in it is the dataset)")
    p.add_argument("--composers", default=",".join(DEFAULT_COMPOSERS),
                   help="comma-separated music21 corpus folders ('schumann' = robert and clara; 'none' to skip "
                        "the corpus); default: %(default)s")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--soundfont", default=DEFAULT_SOUNDFONT,
                   help="General MIDI soundfont; several, comma-separated, vary the timbre (one per piece)")
    p.add_argument("--max-pieces", type=int, default=None, help="only the first N works (composers interleaved)")
    p.add_argument("--recordings", type=Path, default=None, help="also convert every audio file under this folder")
    p.add_argument("--retry-failed", action="store_true", help="try works recorded in failures.json again")
    p.add_argument("--parse-timeout", type=int, default=PARSE_TIMEOUT_S, help="seconds per score (default %(default)s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.monotonic()
    out: Path = args.out
    composers = [c.strip() for c in args.composers.split(",") if c.strip() and c.strip() != "none"]
    soundfonts = [Path(s) for s in args.soundfont.split(",") if s]
    if composers:
        missing = [str(s) for s in soundfonts if not s.is_file()]
        if missing:
            sys.exit(f"soundfont not found: {', '.join(missing)} (apt-get install fluid-soundfont-gm)")
        if subprocess.run(["sh", "-c", "command -v fluidsynth"], capture_output=True).returncode:
            sys.exit("fluidsynth not found (apt-get install fluidsynth)")
    if args.recordings is not None and not args.recordings.is_dir():
        sys.exit(f"--recordings {args.recordings} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / ".tmp", ignore_errors=True)  # render scratch of an interrupted run
    for stale in out.rglob(".*.tmp*"):  # half-written files of an interrupted run
        stale.unlink()
    state = State(out)
    command = "python -m data.build_audio " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    state.runs.append({"command": command, "started": started})
    if composers:
        works = find_works(composers)
        if args.max_pieces is not None:
            works = works[: args.max_pieces]
        build_midi(works, out, state, args.workers, args.parse_timeout, args.retry_failed)
        render_all(works, out, state, soundfonts, args.workers, args.retry_failed)
    if args.recordings is not None:
        convert_recordings(args.recordings, out, state, args.retry_failed)
    state.reconcile()
    state.runs[-1]["seconds"] = round(time.monotonic() - t0)
    state.save()
    write_readme(out, state, soundfonts)
    total = sum(f["seconds"] for f in state.files.values()) / 3600
    logger.info("done in %.0f s: %d files, %.2f h in %s; %d failures recorded", time.monotonic() - t0,
                len(state.files), total, out / "audio", len(state.failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
