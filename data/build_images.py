"""Build a 64x64 image dataset of real photographs from Debian packages, in the ImageNet-64 npz layout.

    python -m data.build_images --out datasets/image64

Sources (installed with apt-get; see ``PACKAGES``): the photographs of gcompris-qt-data (read from
its Qt resource files with PySide6's QResource), the photographic wallpapers of lomiri-wallpapers-16.04,
mate-backgrounds (nature/) and plasma-workspace-wallpapers, the photographs among opencv-doc's
example data, and the photographic cut-outs among tuxpaint-stamps-default, composited onto crops of
the photographs. Abstract renderings, drawings, calibration charts and text are left out by name.

Each photograph gives random square crops at several scales, box-downsampled to 64x64 as the
downsampled-ImageNet release did; near-duplicate crops are dropped; photographs that are near
duplicates of each other form one group, and train/val is split by group, so no photograph (or
copy of it) is in both. The output is ``train_data_batch_*.npz`` and ``val_data.npz``
(data.imagenet64 reads them), ``manifest.json`` (every image's source, crop and licence) and a
README.md with the sources, their licences and the counts. The same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import logging
import re
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from media.image import IMAGE_SIZE, load_image, to_rgb

from .imagenet64 import write_imagenet64_npz
from .loader import DESCRIPTION
from .splits import check_fraction, hash_split

logger = logging.getLogger(__name__)

PACKAGES = ("gcompris-qt-data", "lomiri-wallpapers-16.04", "mate-backgrounds", "plasma-workspace-wallpapers",
            "opencv-doc", "tuxpaint-stamps-default")
DOC = Path("/usr/share/doc")
GCOMPRIS_RCC = Path("/usr/share/gcompris-qt/rcc")
# gcompris activities whose images are photographs (others hold drawings, paintings, maps, icons)
GCOMPRIS_ACTIVITIES = ("categorization", "explore_monuments", "erase", "explore_world_animals",
                       "explore_farm_animals", "explore_world_music")
LOMIRI = ("Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
          "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "analogpattern_by_Peter_Nerlich",
          "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi",
          "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")
PLASMA = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Kite",
          "OneStandsOut", "Path", "Volna", "summer_1am")
OPENCV = ("aero1", "aero3", "aloeL", "aloeR", "apple", "baboon", "basketball1", "basketball2", "board", "box",
          "box_in_scene", "building", "butterfly", "chicky_512", "ela_original", "fruits", "graf1", "graf3", "home",
          "leuvenA", "leuvenB", "licenseplate_motion", "messi5", "orange", "pca_test1", "rubberwhale1",
          "rubberwhale2", "smarties", "squirrel_cls", "stuff")
# tuxpaint stamp folders that hold objects; a stamp counts as a photograph when its opaque pixels use
# many distinct colours (drawings use flat fills): measured, drawings fall below 0.04, photographs above 0.05
STAMP_FOLDERS = ("animals", "food", "plants", "household", "hobbies", "vehicles", "town/monuments", "military",
                 "clothes", "sports")
STAMP_MIN_COLOUR_VARIETY = 0.05


@dataclass
class Photo:
    """One source picture: ``key`` is unique and stable (it seeds the crops and names the group)."""

    key: str
    package: str
    licence: str
    read: Callable[[], Image.Image] = field(repr=False)


# ---------------------------------------------------------------------------------------------- licences

def copyright_licences(package: str) -> list[tuple[list[str], str]]:
    """The (Files patterns, License) paragraphs of a package's machine-readable debian/copyright."""
    text = (DOC / package / "copyright").read_text(encoding="utf-8", errors="replace")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", block, re.M)
        lic = re.search(r"^License:[ \t]*(\S.*)$", block, re.M)
        if files and lic:
            paragraphs.append((files.group(1).split(), lic.group(1).strip()))
    return paragraphs


def licence_of(paragraphs: list[tuple[list[str], str]], path: str, any_extension: bool = False) -> str:
    """The licence of ``path`` (relative to the upstream source): the last matching paragraph wins (DEP-5).
    ``any_extension`` matches patterns whatever the file extension (gcompris ships .jpg sources as .webp)."""
    found = "unknown"
    stem = path.rsplit(".", 1)[0] if any_extension else path
    for patterns, lic in paragraphs:
        for pattern in patterns:
            target = pattern.rsplit(".", 1)[0] if any_extension and "/" in pattern else pattern
            if fnmatch.fnmatchcase(stem, target):
                found = lic
    return found


# ----------------------------------------------------------------------------------------------- sources

def _open_rgb(data: bytes | Path) -> Image.Image:
    """The picture in ``data`` (bytes or a file) as RGB, transparency composited on white."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.load()
        return to_rgb(im)


def gcompris_photos() -> list[Photo]:
    """The photographs inside gcompris-qt-data's Qt resource files (PySide6 QResource + QFile)."""
    from PySide6.QtCore import QDirIterator, QFile, QIODevice, QResource

    licences = copyright_licences("gcompris-qt-data")
    photos = []
    for activity in GCOMPRIS_ACTIVITIES:
        rcc = GCOMPRIS_RCC / f"{activity}.rcc"
        root = f"/{activity}"
        if not QResource.registerResource(str(rcc), root):
            raise RuntimeError(f"cannot open the Qt resource file {rcc}")
        it = QDirIterator(f":{root}", QDirIterator.IteratorFlag.Subdirectories)
        names = []
        while it.hasNext():
            name = it.next()
            if name.lower().endswith((".webp", ".jpg", ".jpeg", ".png")):
                names.append(name)
        for name in sorted(names):
            f = QFile(name)
            if not f.open(QIODevice.OpenModeFlag.ReadOnly):
                raise RuntimeError(f"cannot read {name} from {rcc}")
            data = bytes(f.readAll().data())
            f.close()
            upstream = name.split("/gcompris/", 1)[-1]  # src/activities/<activity>/resource/...
            photos.append(Photo(f"gcompris/{upstream}", "gcompris-qt-data",
                                licence_of(licences, upstream, any_extension=True),
                                lambda data=data: _open_rgb(data)))
    return photos


def _file_photos(package: str, paths: Iterable[tuple[Path, str]]) -> list[Photo]:
    licences = copyright_licences(package)
    photos = []
    for path, upstream in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {package} installed? (apt-get install {package})")
        photos.append(Photo(f"{package}/{upstream}", package, licence_of(licences, upstream),
                            lambda path=path: _open_rgb(path)))
    return photos


def wallpaper_photos() -> list[Photo]:
    """The photographic wallpapers of lomiri (16.04), mate (nature/) and plasma (largest size of each)."""
    lomiri = [(Path(f"/usr/share/backgrounds/{n}.jpg"), f"16.04/{n}.jpg") for n in LOMIRI]
    mate_dir = Path("/usr/share/backgrounds/mate/nature")
    mate = [(p, f"nature/{p.name}") for p in sorted(mate_dir.glob("*.jpg"))]
    plasma = []
    for name in PLASMA:
        images = sorted(Path(f"/usr/share/wallpapers/{name}/contents/images").glob("*.*"),
                        key=lambda p: (p.stat().st_size, p.name))
        plasma.append((images[-1] if images else Path(f"/usr/share/wallpapers/{name}"), f"{name}/{name}"))
    return (_file_photos("lomiri-wallpapers-16.04", lomiri) + _file_photos("mate-backgrounds", mate)
            + _file_photos("plasma-workspace-wallpapers", plasma))


def opencv_photos() -> list[Photo]:
    data = Path("/usr/share/doc/opencv-doc/examples/data")
    found = {p.stem: p for p in data.glob("*") if p.suffix.lower() in (".jpg", ".png")}
    paths = [(found.get(n, data / f"{n}.jpg"), f"samples/data/{found[n].name if n in found else n}") for n in OPENCV]
    return _file_photos("opencv-doc", paths)


def colour_variety(rgba: np.ndarray) -> float:
    """Distinct colours (6 bits a channel) per opaque pixel of uint8 [H, W, 4]: drawings low, photos high."""
    px = rgba[rgba[..., 3] > 200][:, :3].astype(np.int32) // 4
    if len(px) == 0:
        return 0.0
    return len(np.unique(px[:, 0] * 4096 + px[:, 1] * 64 + px[:, 2])) / len(px)


def stamp_cutouts() -> list[tuple[str, str, Image.Image]]:
    """(key, licence, RGBA image) of the photographic tuxpaint stamps."""
    root = Path("/usr/share/tuxpaint/stamps")
    licences = copyright_licences("tuxpaint-stamps-default")
    stamps = []
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(STAMP_FOLDERS) or "cartoon" in rel:
            continue
        with Image.open(path) as im:
            rgba = im.convert("RGBA")
        pixels = np.asarray(rgba)
        if (pixels[..., 3] > 200).sum() >= 500 and colour_variety(pixels) >= STAMP_MIN_COLOUR_VARIETY:
            stamps.append((f"tuxpaint-stamps-default/{rel}", licence_of(licences, f"stamps/{rel}"), rgba))
    if not stamps:
        raise FileNotFoundError("no tuxpaint stamps found: apt-get install tuxpaint-stamps-default")
    return stamps


# ------------------------------------------------------------------------------------------ crops, dedup

def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _square_box(size: tuple[int, int], rng: np.random.Generator, min_scale: float, min_side: int
                ) -> tuple[int, int, int]:
    """A random square (left, top, side) inside an image of ``size``: side log-uniform in [min_scale, 1]
    of the short side, never below ``min_side`` pixels (unless the image is smaller)."""
    w, h = size
    short = min(w, h)
    lo = min(1.0, max(min_scale, min_side / short))
    side = max(min_side, int(round(short * np.exp(rng.uniform(np.log(lo), 0.0)))))
    side = min(side, short)
    return int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)), side


def random_crop(im: Image.Image, rng: np.random.Generator, min_scale: float, size: int = IMAGE_SIZE
                ) -> tuple[np.ndarray, list[int]]:
    """A square crop whose side is a log-uniform fraction in [min_scale, 1] of the short side (never
    below ``size`` pixels), box-downsampled to uint8 [size, size, 3]; flipped left-right half the time.
    Returns the crop and [left, top, side, flipped]."""
    left, top, side = _square_box(im.size, rng, min_scale, size)
    flip = bool(rng.random() < 0.5)
    crop = im.resize((size, size), Image.Resampling.BOX, box=(left, top, left + side, top + side))
    arr = np.asarray(crop, dtype=np.uint8)
    return (arr[:, ::-1] if flip else arr).copy(), [left, top, side, int(flip)]


def composite(background: Image.Image, stamp: Image.Image, rng: np.random.Generator, min_scale: float
              ) -> tuple[np.ndarray, list[float]]:
    """A cut-out pasted onto a random crop of a photograph at 4x resolution, then box-downsampled to 64x64.
    The cut-out's longer side is 45-90% of the frame; it is placed fully inside. Returns image and
    [stamp scale, x, y, flipped]."""
    big = 4 * IMAGE_SIZE
    left, top, side = _square_box(background.size, rng, min_scale, big)
    frame = background.resize((big, big), Image.Resampling.BOX, box=(left, top, left + side, top + side))
    frame = frame.convert("RGBA")
    scale = float(rng.uniform(0.45, 0.9))
    sw, sh = stamp.size
    f = scale * big / max(sw, sh)
    cut = stamp.resize((max(1, round(sw * f)), max(1, round(sh * f))), Image.Resampling.LANCZOS)
    flip = bool(rng.random() < 0.5)
    if flip:
        cut = cut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x, y = int(rng.integers(0, big - cut.width + 1)), int(rng.integers(0, big - cut.height + 1))
    frame.alpha_composite(cut, (x, y))
    small = frame.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy(), [round(scale, 3), x, y, int(flip)]


def signature(image: np.ndarray) -> np.ndarray:
    """8x8 grey thumbnail of uint8 [64, 64, 3], mean removed and scaled to unit norm (float32 [64])."""
    grey = image.astype(np.float32).mean(axis=2)
    s = grey.reshape(8, image.shape[0] // 8, 8, image.shape[1] // 8).mean(axis=(1, 3)).ravel()
    s -= s.mean()
    n = np.linalg.norm(s)
    return s / n if n > 1e-3 else s


class NearDuplicates:
    """Keeps signatures; ``is_new(sig)`` is False when a kept one is within ``threshold`` (flat crops,
    whose signatures are near zero, count as duplicates of each other)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.kept: list[np.ndarray] = []

    def is_new(self, sig: np.ndarray) -> bool:
        if self.kept and np.min(np.linalg.norm(np.stack(self.kept) - sig, axis=1)) < self.threshold:
            return False
        self.kept.append(sig)
        return True


def photo_groups(photos: list[Photo], thumbs: dict[str, np.ndarray], threshold: float) -> dict[str, str]:
    """key -> group name: photographs whose centre thumbnails are near duplicates share a group (union-find)."""
    parent = {p.key: p.key for p in photos}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    keys = [p.key for p in photos]
    sigs = np.stack([signature(thumbs[k]) for k in keys])
    for i in range(len(keys)):
        close = np.nonzero(np.linalg.norm(sigs[i + 1:] - sigs[i], axis=1) < threshold)[0]
        for j in close + i + 1:
            a, b = find(keys[i]), find(keys[int(j)])
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {k: find(k) for k in keys}


# ------------------------------------------------------------------------------------------------ build

@dataclass
class Settings:
    crops_train: int = 48
    crops_val: int = 8
    composites_train: int = 6000
    composites_val: int = 200
    min_scale: float = 0.25
    val_fraction: float = 0.1
    seed: int = 0
    dedup: float = 0.25
    shard: int = 10000


def build(out: Path, s: Settings) -> dict:
    """Write the dataset to ``out``; returns the summary that README.md and manifest.json describe."""
    check_fraction(s.val_fraction)
    photos = gcompris_photos() + wallpaper_photos() + opencv_photos()
    if len({p.key for p in photos}) != len(photos):
        raise RuntimeError("photo keys are not unique")
    logger.info("decoding %d photographs", len(photos))
    decoded = {p.key: p.read() for p in photos}
    thumbs = {k: load_image(im) for k, im in decoded.items()}
    groups = photo_groups(photos, thumbs, threshold=0.15)
    split = {k: hash_split(g, s.val_fraction, s.seed) for k, g in groups.items()}
    stamps = stamp_cutouts()
    stamp_split = {key: hash_split(key, s.val_fraction, s.seed) for key, _, _ in stamps}

    images: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    manifest: dict[str, list[dict]] = {"train": [], "val": []}
    dropped = 0
    for p in photos:
        sp = split[p.key]
        rng, seen = _rng(s.seed, p.key), NearDuplicates(s.dedup)
        for _ in range(s.crops_train if sp == "train" else s.crops_val):
            arr, box = random_crop(decoded[p.key], rng, s.min_scale)
            if not seen.is_new(signature(arr)):
                dropped += 1
                continue
            images[sp].append(arr)
            manifest[sp].append({"source": p.key, "group": groups[p.key], "licence": p.licence,
                                 "crop": box})
    for sp, count in (("train", s.composites_train), ("val", s.composites_val)):
        backs = [p for p in photos if split[p.key] == sp]
        cuts = [st for st in stamps if stamp_split[st[0]] == sp]
        rng = _rng(s.seed, f"composites/{sp}")
        for _ in range(count if backs and cuts else 0):
            p, (skey, slic, cut) = backs[rng.integers(len(backs))], cuts[rng.integers(len(cuts))]
            arr, place = composite(decoded[p.key], cut, rng, s.min_scale)
            images[sp].append(arr)
            manifest[sp].append({"source": p.key, "group": groups[p.key], "licence": p.licence,
                                 "stamp": skey, "stamp_licence": slic, "placement": place})

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*_data*.npz"):
        old.unlink()
    labels = {g: i for i, g in enumerate(sorted(set(groups.values())))}
    for sp in ("train", "val"):
        data = np.stack(images[sp]) if images[sp] else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        lab = np.array([labels[m["group"]] for m in manifest[sp]], np.int64)
        if sp == "val":
            write_imagenet64_npz(out / "val_data.npz", data, lab)
        else:
            for i, start in enumerate(range(0, len(data), s.shard)):
                write_imagenet64_npz(out / f"train_data_batch_{i + 1}.npz", data[start: start + s.shard],
                                     lab[start: start + s.shard])
    summary = _summary(photos, split, groups, stamps, stamp_split, manifest, dropped, s)
    (out / "manifest.json").write_text(json.dumps({"settings": vars(s), "summary": summary,
                                                   "images": manifest}, indent=0))
    (out / "README.md").write_text(readme(summary, s))
    (out / DESCRIPTION).write_text(json.dumps(description(out.name, summary), indent=2) + "\n")
    return summary


def description(name: str, summary: dict) -> dict:
    """dataset.json: what train.py copies into a model card (sources, licences, size)."""
    licences: dict[str, int] = {}
    for counts in [d["licences"] for d in summary["packages"].values()] + [summary["stamps"]["licences"]]:
        for lic, n in counts.items():
            licences[lic] = licences.get(lic, 0) + n
    packages = ", ".join(f"{pkg} ({d['photographs']})" for pkg, d in summary["packages"].items())
    return {"name": name, "builder": "python -m data.build_images",
            "sources": f"{summary['photographs']} photographs from Debian packages {packages}, and "
                       f"{summary['stamps']['cutouts']} photographic cut-outs from tuxpaint-stamps-default "
                       "composited onto them; 64x64 box-downsampled crops",
            "licences": dict(sorted(licences.items(), key=lambda kv: -kv[1])), "images": summary["images"]}


def _summary(photos, split, groups, stamps, stamp_split, manifest, dropped, s) -> dict:
    by_package: dict[str, dict] = {}
    for p in photos:
        d = by_package.setdefault(p.package, {"photographs": 0, "val": 0, "licences": {}})
        d["photographs"] += 1
        d["val"] += split[p.key] == "val"
        d["licences"][p.licence] = d["licences"].get(p.licence, 0) + 1
    st_lic: dict[str, int] = {}
    for _, lic, _ in stamps:
        st_lic[lic] = st_lic.get(lic, 0) + 1
    return {"packages": by_package,
            "photographs": len(photos), "groups": len(set(groups.values())),
            "stamps": {"cutouts": len(stamps), "val": sum(v == "val" for v in stamp_split.values()),
                       "licences": st_lic},
            "images": {sp: len(m) for sp, m in manifest.items()},
            "composites": {sp: sum("stamp" in x for x in m) for sp, m in manifest.items()},
            "near_duplicate_crops_dropped": dropped}


def readme(summary: dict, s: Settings) -> str:
    """The dataset's README: what is in it, where it came from, under which licences, and how it was made."""
    rows = "\n".join(f"| {pkg} | {d['photographs']} | {d['val']} | "
                     + ", ".join(f"{lic} ({n})" for lic, n in sorted(d["licences"].items())) + " |"
                     for pkg, d in summary["packages"].items())
    st = summary["stamps"]
    stamp_licences = ", ".join(f"{k} ({v})" for k, v in st["licences"].items())
    return f"""# image64: 64x64 crops of real photographs (ImageNet-64 npz layout)

Built offline by `python -m data.build_images` from Debian packages ({", ".join(PACKAGES)}).
Read it with `data.imagenet64.ImageNet64` (or `train.py image --data <this folder>`).

| split | images | of which composites |
|---|---|---|
| train | {summary["images"]["train"]} | {summary["composites"]["train"]} |
| val | {summary["images"]["val"]} | {summary["composites"]["val"]} |

## Sources

| package | photographs kept | in val | licences (count) |
|---|---|---|---|
{rows}
| tuxpaint-stamps-default (cut-outs) | {st["cutouts"]} | {st["val"]} | {stamp_licences} |

Kept: gcompris activities {", ".join(GCOMPRIS_ACTIVITIES)} (photographs of animals, fish, monuments,
tools, objects); the photographic wallpapers only (lomiri 16.04: {len(LOMIRI)}, mate nature/, plasma:
{len(PLASMA)}); opencv-doc example photographs ({len(OPENCV)}, without calibration charts, renders, text,
logos and paintings); tuxpaint stamps under {", ".join(STAMP_FOLDERS)} whose colour variety (distinct
colours per opaque pixel) is at least {STAMP_MIN_COLOUR_VARIETY} (photographs; drawings have flat fills).
Left out: gcompris drawings, paintings, maps and icons; abstract wallpapers (gnome-backgrounds,
ukui-wallpapers, sway-backgrounds, the abstract plasma and mate ones); the photographs in the
scikit-image and scikit-learn wheels (kept as an outside test set). Licences are read per file from
each package's debian/copyright (`unknown` where it names none); `manifest.json` lists every image's
source photograph, crop box (left, top, side, flipped) or composite placement, and licences.

## How it was made

- Crops: square, side log-uniform in [{s.min_scale}, 1] of the photograph's short side (never under 64 px),
  box-downsampled to 64x64, flipped left-right half the time. {s.crops_train} per train photograph,
  {s.crops_val} per val photograph.
- Composites: a cut-out (45-90% of the frame) on a crop of a photograph of the same split, at 256x256,
  then box-downsampled: {s.composites_train} train, {s.composites_val} val.
- Near duplicates: crops of one photograph whose 8x8 grey signatures are closer than {s.dedup} are dropped
  ({summary["near_duplicate_crops_dropped"]} dropped); photographs closer than 0.15 are one group
  ({summary["photographs"]} photographs, {summary["groups"]} groups).
- Split: by group, with a stable hash (seed {s.seed}, val fraction {s.val_fraction}): no photograph or copy
  of it is in both splits; cut-outs are split the same way.
"""


def parse_args(argv: list[str] | None = None) -> tuple[Path, Settings]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder (created)")
    d = Settings()
    for name, value in vars(d).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    a = ap.parse_args(argv)
    s = Settings(**{k: getattr(a, k) for k in vars(d)})
    for name in ("crops_train", "crops_val", "composites_train", "composites_val"):
        if getattr(s, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    if not 0 < s.min_scale <= 1:
        ap.error("--min-scale must be in (0, 1]")
    if not 0 <= s.val_fraction <= 1:
        ap.error("--val-fraction must be in [0, 1]")
    if s.shard < 1:
        ap.error("--shard must be >= 1")
    return a.out, s


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out, s = parse_args(argv)
    summary = build(out, s)
    logger.info("wrote %s: %s", out, json.dumps(summary["images"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
