"""Lecture mode: a reveal.js deck of each lecture notebook that presents with no network.

`jupyter nbconvert --to slides` writes decks that load reveal.js, require.js, jQuery and MathJax
from CDNs at presentation time. `build_decks` writes the same decks (nbconvert's SlidesExporter,
the cells' `slideshow` metadata; 16:9 slides, long code lines wrapped for a projector), but first
puts those libraries next to them in `vendor/`: each is fetched once with npm (the npm registry's
own client), checked against its sha1 and cached in `cache_dir()/npm`, so later builds need no
network either. Without npm and without that cache the decks fall back to nbconvert's CDN
addresses, and the build says so.

    python -m course_lib.slides [--out slides] [--cdn] NOTEBOOK ...     # what `make slides` runs
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nbconvert import SlidesExporter
from traitlets.config import Config

from .runtime import cache_dir, log


@dataclass(frozen=True)
class VendoredLibrary:
    """An npm package a deck loads, and the SlidesExporter setting that points the deck at it."""

    package: str
    version: str
    sha1: str  # the registry's dist.shasum of the tarball
    setting: str
    entry: str  # path inside the package the setting points to ("" = the package folder)
    skip: tuple[str, ...] = ()  # paths inside the package the decks never load


# The versions nbconvert's reveal template is written for (its CDN defaults), except jQuery,
# whose 2.0.3 is not on npm; the template only uses `$` for scrolling slides.
LIBRARIES = (
    VendoredLibrary("reveal.js", "4.0.2", "2e5e9f8ed0fa239924b448f21d4238c5aa6e852e",
                    "reveal_url_prefix", ""),
    VendoredLibrary("requirejs", "2.1.10", "1e1d7f608790e532a422c6199dad2abe15484b54",
                    "require_js_url", "require.js"),
    VendoredLibrary("jquery", "3.7.1", "083ef98927c9a6a74d05a6af02806566d16274de",
                    "jquery_url", "dist/jquery.min.js"),
    # 60 MB unpacked; the decks use the CommonHTML output with the TeX fonts, about 20 MB of it.
    VendoredLibrary("mathjax", "2.7.7", "22ff89550a7b1f5f06a037d13da5ff3c33e11ec4",
                    "mathjax_url", "MathJax.js?config=TeX-AMS_CHTML-full,Safe",
                    skip=("unpacked/", "jax/output/SVG/", "fonts/HTML-CSS/Asana-Math/",
                          "fonts/HTML-CSS/Gyre-Pagella/", "fonts/HTML-CSS/Gyre-Termes/",
                          "fonts/HTML-CSS/Latin-Modern/", "fonts/HTML-CSS/Neo-Euler/",
                          "fonts/HTML-CSS/STIX-Web/")),
)
VENDOR_DIR = "vendor"
# 16:9 like most projectors, and wide enough for the ~100-character code lines of the notebooks
# (nbconvert's default is 960 x 700); reveal.js scales the slide to the screen.
SLIDE_SIZE = (1280, 720)
# Longer code lines wrap instead of running off the slide's right edge.
DECK_CSS = "<style>.reveal pre { white-space: pre-wrap; overflow-wrap: anywhere; }</style>"


class OfflineLibrariesUnavailable(RuntimeError):
    """A library the decks load can be neither found in the cache nor fetched with npm."""


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def npm_tarball(library: VendoredLibrary) -> Path:
    """The library's npm tarball from the cache, else `npm pack` it there once (sha1-checked)."""
    cached = cache_dir() / "npm" / f"{library.package}-{library.version}.tgz"
    if cached.is_file() and _sha1(cached) == library.sha1:
        return cached
    npm = shutil.which("npm")
    if npm is None:
        raise OfflineLibrariesUnavailable(
            f"{library.package}@{library.version} is not in {cached.parent} and npm is not installed")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        result = subprocess.run([npm, "pack", f"{library.package}@{library.version}",
                                 "--pack-destination", tmp, "--silent"], capture_output=True, text=True)
        packed = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(packed) != 1 or _sha1(packed[0]) != library.sha1:
            raise OfflineLibrariesUnavailable(
                f"npm pack {library.package}@{library.version} failed or gave an unexpected file:\n"
                f"{result.stderr.strip()[-600:]}")
        packed[0].replace(cached)
    return cached


def unpack_library(library: VendoredLibrary, vendor: Path) -> Path:
    """Unpack the library's tarball into vendor/<package>/ (once per version); return that folder."""
    target = vendor / library.package
    stamp = target / ".vendored"
    if stamp.is_file() and stamp.read_text() == library.version:
        return target
    tarball = npm_tarball(library)
    shutil.rmtree(target, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        members = []
        for member in archive.getmembers():
            inner = member.name.split("/", 1)[1] if "/" in member.name else ""
            if (member.isfile() or member.isdir()) and inner and not inner.startswith(library.skip):
                member.name = inner
                members.append(member)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
        archive.extractall(target, members=members, **safe)
    stamp.write_text(library.version)
    return target


def offline_settings(out_dir: Path) -> dict[str, str]:
    """SlidesExporter settings that point decks in out_dir at libraries vendored beside them."""
    settings = {"reveal_theme": "white"}  # its fonts ship with reveal.js; nbconvert's "simple" uses Google's
    for library in LIBRARIES:
        unpack_library(library, out_dir / VENDOR_DIR)
        url = f"{VENDOR_DIR}/{library.package}"
        settings[library.setting] = f"{url}/{library.entry}" if library.entry else url
    return settings


def build_deck(notebook: Path, out_dir: Path, settings: dict[str, str] | None = None) -> Path:
    """nbconvert's reveal.js deck of one notebook, written to out_dir/<name>.slides.html."""
    width, height = SLIDE_SIZE
    exporter = SlidesExporter(config=Config({"SlidesExporter": {
        "reveal_width": str(width), "reveal_height": str(height), **(settings or {})}}))
    html, _ = exporter.from_filename(str(notebook))
    html = html.replace("</head>", DECK_CSS + "\n</head>", 1)
    deck = out_dir / f"{Path(notebook).stem}.slides.html"
    deck.write_text(html, encoding="utf-8")
    return deck


def build_decks(notebooks: Sequence[Path], out_dir: Path, offline: bool = True) -> list[Path]:
    """A deck per notebook in out_dir, with its libraries vendored when offline (else from CDNs)."""
    if not notebooks:
        raise ValueError("notebooks must name at least one .ipynb file, got none")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {}
    if offline:
        try:
            settings = offline_settings(out_dir)
            log(f"the decks load their libraries from {out_dir / VENDOR_DIR}: no network needed")
        except OfflineLibrariesUnavailable as error:
            log(f"{error}.\nThe decks load reveal.js and MathJax from CDNs: they need the internet "
                 "while presenting. Install Node.js (npm) and run `make slides` again for offline decks.")
    return [build_deck(Path(notebook), out_dir, settings) for notebook in notebooks]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.slides", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("slides"))
    parser.add_argument("--cdn", action="store_true", help="load the libraries from CDNs (no vendor/)")
    args = parser.parse_args(argv)
    for deck in build_decks(args.notebooks, args.out, offline=not args.cdn):
        print(deck)


if __name__ == "__main__":
    main()
