"""The text OCR reads on one page of a scanned PDF or an image, one page per call.

The parse stage calls `ocr_page` in a sandbox worker for one page at a time: the page is
rendered (PDF) or decoded (image), read and let go before the next, so memory stays flat
whatever the page count. The engine is loaded once per worker process, on one thread.

Tesseract, run in process through tesserocr, at 200 DPI, because of `python -m
bench.ocr_compare` (6 A4 pages of English prose, one core, one thread, 2026-12-01, on a
2-core machine busy with other work):

- Accuracy first. Body text (10-12 pt): Tesseract found every known word (recall 1.000, CER
  0.000) at 150 and at 200 DPI; RapidOCR 0.78 and 0.89, worst page 0.48: its recogniser (the
  PP-OCRv4 Chinese/English model, the only one in its wheel) runs small Latin words together
  ("thelibrarywillclose"). Small print, scanned (6-7 pt; 300 DPI, skewed, blurred, noisy,
  JPEG): Tesseract 0.975 at 150 DPI, 0.988 at 200 (CER 0.009, 0.004); RapidOCR 0.17.
- Speed: 0.27-0.40 CPU s a page for Tesseract (2.2-3.1 pages/s on the quieter runs), 2.7-4.5
  for RapidOCR (0.15-0.28 pages/s): ten times the cost.
- Memory: Tesseract peaks at 156-180 MB RSS (310 MB of address space), RapidOCR at 780-1,030
  MB (1.4-1.6 GB), more than SLUICE_OCR_PAGE_MEMORY_MB's default 1024 allows: there ONNX
  Runtime fails with bad_alloc (1536 is enough).
- In process rather than its command line (pytesseract): the same words, for 0.46-0.83 CPU s
  a page (a process and a model load per page), 210-280 MB across the two processes, and a
  tesseract process that outlives a worker killed at its time limit.
- Install: tesserocr is one manylinux wheel with libtesseract 5.5 inside (CPython 3.11-3.13
  on x86-64, 3.11 on arm64 too) plus the English model, Debian's tesseract-ocr-eng (4 MB,
  data only). RapidOCR's wheel carries its models but stops at Python 3.12, and pulls
  opencv-python (about 190 MB), whose cv2 needs libGL (apt libgl1 libglib2.0-0) or a swap
  for opencv-python-headless.

200 DPI rather than 150: the same on body text, half the character errors on small print,
for up to 25% more CPU a page.
"""

from __future__ import annotations

import importlib
import math
import os
import pathlib
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import pypdfium2 as pdfium
from PIL import Image, ImageOps

from contracts import media
from contracts.errors import Permanent, Transient

# pdf.py owns PDFium access (its lock, its errors) and the text clean-up; OCR shares both.
from stages.formats.pdf import PDFIUM_LOCK, clean_text, damaged_page, open_pdf

OCR_ENGINES = ("tesseract", "rapidocr")
DEFAULT_OCR_ENGINE = "tesseract"
OCR_DPI = 200
# An A4 scan at 600 DPI is 35 Mpx and passes; a decompression bomb (a small file that
# inflates to gigapixels) does not. Grey at 40 Mpx is 40 MB, well inside the sandbox's limit.
MAX_OCR_PIXELS = 40_000_000
# The literal values of contracts.media's image constants (added there by the parse stage).
PNG, JPEG, TIFF = "image/png", "image/jpeg", "image/tiff"
IMAGE_TYPES = frozenset({PNG, JPEG, TIFF})
# Where Tesseract's models are installed (Debian/Ubuntu's tesseract-ocr-eng, Homebrew, source
# builds); TESSDATA_PREFIX, Tesseract's own variable, comes first. tesserocr needs the path.
_TESSDATA_DIRS = (
    "/usr/share/tesseract-ocr/5/tessdata",
    "/usr/share/tesseract-ocr/4.00/tessdata",
    "/usr/share/tessdata",
    "/usr/local/share/tessdata",
    "/opt/homebrew/share/tessdata",
)
_INSTALL = {
    "tesseract": "install the Python package tesserocr (a Sluice dependency) and the English "
    "model: apt-get install --no-install-recommends tesseract-ocr-eng, or set TESSDATA_PREFIX "
    "to a folder holding eng.traineddata",
    "rapidocr": "install rapidocr-onnxruntime (Python 3.12 or older: pip install "
    "'sluice[rapidocr]'); its opencv-python needs apt-get install libgl1 libglib2.0-0",
}


class OcrReader(Protocol):
    """An OCR engine, loaded: the raw text it reads in a grey image."""

    def read(self, image: Image.Image) -> str:
        """The engine's text for `image`, as it gives it."""
        ...


def ocr_page(
    path: pathlib.Path, content_type: str, page: int, engine: str = DEFAULT_OCR_ENGINE
) -> str:
    """The text OCR reads on page `page` (1-based) of a PDF or image file."""
    reader = ocr_reader(engine)
    if content_type == media.PDF:
        image = render_pdf_page(path, page, OCR_DPI)
    elif content_type in IMAGE_TYPES:
        image = _image_frame(path, content_type, page)
    else:
        raise ValueError(f"ocr_page reads PDFs and {sorted(IMAGE_TYPES)}, not {content_type!r}")
    try:
        return ocr_image(image, reader)
    finally:
        image.close()


def ocr_image(image: Image.Image, engine: str | OcrReader = DEFAULT_OCR_ENGINE) -> str:
    """The cleaned text an engine reads in `image` (any mode; grey is what engines see)."""
    reader = ocr_reader(engine) if isinstance(engine, str) else engine
    return clean_text(reader.read(_grey(image)))


def image_page_count(path: pathlib.Path, content_type: str) -> int:
    """How many pages an image file has (a multi-page TIFF's frames; PNG and JPEG: 1)."""
    with _opened(path, content_type) as image:
        # Only TIFF pages are pages: an animated PNG's frames are not.
        return int(getattr(image, "n_frames", 1)) if content_type == TIFF else 1


def engine_available(engine: str) -> str | None:
    """None when `engine` can run here, else a sentence saying what to install."""
    _check_name(engine)
    package = "tesserocr" if engine == "tesseract" else "rapidocr_onnxruntime"
    try:
        # Importing is the check: opencv-python imports only where libGL is installed.
        importlib.import_module(package)
    except ImportError as exc:
        missing = f"the Python package {package} does not import ({exc})"
    else:
        if engine == "rapidocr" or _tessdata() is not None:
            return None
        missing = f"Tesseract's English model is not in {', '.join(_tessdata_dirs())}"
    return f"{missing}; {_INSTALL[engine]}."


def render_pdf_page(path: pathlib.Path, page: int, dpi: int) -> Image.Image:
    """Page `page` (1-based) of the PDF as a grey image at `dpi`, smaller if over the limit."""
    with PDFIUM_LOCK:
        document = open_pdf(path)
        try:
            count = len(document)
            if not 1 <= page <= count:
                raise ValueError(f"page {page} is outside the PDF's pages 1-{count}")
            try:
                pdf_page = document[page - 1]
                try:
                    width, height = pdf_page.get_size()
                    bitmap = pdf_page.render(scale=_scale(width, height, dpi), grayscale=True)
                    try:
                        # to_pil shares the bitmap's buffer, which close() frees.
                        image: Image.Image = bitmap.to_pil().copy()
                        return image
                    finally:
                        bitmap.close()
                finally:
                    pdf_page.close()
            except pdfium.PdfiumError as exc:
                raise damaged_page(page, "rendered for OCR", exc) from exc
        finally:
            document.close()


def _scale(width_pt: float, height_pt: float, dpi: int) -> float:
    # A huge page (PDF allows 200 inches a side) is read at a lower resolution, not refused.
    scale = dpi / 72
    if width_pt * height_pt * scale * scale > MAX_OCR_PIXELS:
        # A pixel less a side than the exact fit: PDFium rounds each side up.
        scale = math.sqrt(MAX_OCR_PIXELS / (width_pt * height_pt)) - 1 / min(width_pt, height_pt)
    return scale


def _image_frame(path: pathlib.Path, content_type: str, page: int) -> Image.Image:
    with _opened(path, content_type) as image:
        frames = int(getattr(image, "n_frames", 1)) if content_type == TIFF else 1
        if not 1 <= page <= frames:
            raise ValueError(f"page {page} is outside the image's pages 1-{frames}")
        try:
            image.seek(page - 1)
            _check_pixels(image, page)
            # Phone photos are stored sideways with an EXIF note saying which way is up.
            upright = ImageOps.exif_transpose(image)
            upright.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _unreadable(content_type, exc) from exc
        return upright


@contextmanager
def _opened(path: pathlib.Path, content_type: str) -> Iterator[Image.Image]:
    """The image, opened lazily (header only), with the bomb check done by us, not by warnings."""
    try:
        with warnings.catch_warnings():
            # Our own limit is stricter than Pillow's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise _too_large(str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise _unreadable(content_type, exc) from exc
    with image:
        _check_pixels(image, 1)
        yield image


def _check_pixels(image: Image.Image, page: int) -> None:
    width, height = image.size
    if width * height > MAX_OCR_PIXELS:
        where = f" (page {page})" if page > 1 else ""
        raise _too_large(f"{width:,} x {height:,} pixels{where}")


def _too_large(what: str) -> Permanent:
    return Permanent(
        f"The image is too large to read ({what}; the limit is {MAX_OCR_PIXELS:,} pixels). "
        "Scan it at a lower resolution (300 DPI is plenty) and upload it again.",
        code="image_too_large",
    )


def _unreadable(content_type: str, exc: BaseException) -> Permanent:
    kind = content_type.removeprefix("image/").upper()
    return Permanent(
        f"The {kind} image could not be read ({type(exc).__name__}: {str(exc).rstrip('.')}); it "
        "may be damaged or truncated. Re-export or re-scan it and upload it again.",
        code="unreadable_image",
    )


def _grey(image: Image.Image) -> Image.Image:
    if image.mode == "L":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit scans: convert("L") would clip every value above 255 to white.
        return image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels are black underneath: put the page on white paper instead.
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, "white")
        return Image.alpha_composite(paper, rgba).convert("L")
    return image.convert("L")


# One engine per process: loading a model costs far more than reading a page.
_LOADED: dict[str, OcrReader] = {}


def ocr_reader(name: str) -> OcrReader:
    """The engine `name`, loaded on first use and kept for the life of the process."""
    _check_name(name)
    if name not in _LOADED:
        _LOADED[name] = _LOADERS[name]()
    return _LOADED[name]


def _check_name(name: str) -> None:
    if name not in OCR_ENGINES:
        raise ValueError(f"unknown OCR engine {name!r}; SLUICE_OCR_ENGINE is one of {OCR_ENGINES}")


def _missing(name: str, why: object) -> Transient:
    return Transient(
        f"The OCR engine {name!r} is not installed on this parse worker ({why}); "
        f"{_INSTALL[name]}; or set SLUICE_OCR_ENGINE to an installed one.",
        code="ocr_engine_missing",
    )


class _Tesseract:
    """Tesseract in this process (tesserocr, its C API): the model is loaded once, not per page."""

    def __init__(self, tessdata: str) -> None:
        import tesserocr

        self._api = tesserocr.PyTessBaseAPI(path=tessdata, lang="eng", psm=tesserocr.PSM.AUTO)
        # One API object is not safe to share between threads; the stage uses processes.
        self._lock = threading.Lock()

    def read(self, image: Image.Image) -> str:
        """Tesseract's text for the page (automatic page segmentation, English)."""
        with self._lock:
            try:
                self._api.SetImage(image)
                return str(self._api.GetUTF8Text())
            except RuntimeError as exc:
                raise Permanent(
                    f"Tesseract could not read the page ({exc}); re-scan it and upload it again.",
                    code="ocr_failed",
                ) from exc
            finally:
                # Let go of the page's image now, not when the next page comes.
                self._api.Clear()


def _load_tesseract() -> OcrReader:
    tessdata = _tessdata()
    if tessdata is None:
        raise _missing("tesseract", f"no eng.traineddata in {', '.join(_tessdata_dirs())}")
    try:
        return _Tesseract(tessdata)
    except ImportError as exc:
        raise _missing("tesseract", exc) from exc


@dataclass
class _RapidOcr:
    """RapidOCR (PP-OCR models on ONNX Runtime): boxes of text, put back into lines."""

    model: Any
    # Its angle classifier turns some upright English lines over and they come out as noise
    # (word recall 0.77 with it, 0.89 without, in the benchmark); scans are read upright.
    use_cls: bool = False

    def read(self, image: Image.Image) -> str:
        """The page's lines, from RapidOCR's boxes of text."""
        import numpy as np

        try:
            found, _ = self.model(np.asarray(image), use_cls=self.use_cls)
        except Exception as exc:
            if "bad_alloc" in str(exc) or "Failed to allocate" in str(exc):
                # ONNX Runtime's way of saying the sandbox's memory limit was reached: the
                # sandbox turns a MemoryError into an error naming the setting to raise.
                raise MemoryError(str(exc)[-300:]) from exc
            raise Permanent(
                f"RapidOCR could not read the page ({type(exc).__name__}: {str(exc)[-300:]}); "
                "re-scan it and upload it again, or set SLUICE_OCR_ENGINE=tesseract.",
                code="ocr_failed",
            ) from exc
        boxes = [
            _Box.of(points, text) for points, text, _score in (found or []) if str(text).strip()
        ]
        return "\n".join(_lines(boxes))


def _load_rapidocr() -> OcrReader:
    try:
        import cv2
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:
        raise _missing("rapidocr", exc) from exc
    # One thread each for OpenCV's resizes and ONNX Runtime: one worker per concurrent message.
    cv2.setNumThreads(1)
    return _RapidOcr(RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1))


_LOADERS: dict[str, Callable[[], OcrReader]] = {
    "tesseract": _load_tesseract,
    "rapidocr": _load_rapidocr,
}


@dataclass(frozen=True)
class _Box:
    top: float
    bottom: float
    left: float
    text: str

    @classmethod
    def of(cls, points: list[list[float]], text: str) -> _Box:
        """The box around a detected quadrilateral."""
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return cls(min(ys), max(ys), min(xs), str(text).strip())

    @property
    def middle(self) -> float:
        """Its vertical centre."""
        return (self.top + self.bottom) / 2


def _lines(boxes: list[_Box]) -> list[str]:
    """Boxes as lines of text, top to bottom, each left to right; a wide gap, a blank line."""
    rows: list[list[_Box]] = []
    for box in sorted(boxes, key=lambda b: b.middle):
        last = rows[-1] if rows else None
        # Same line when its centre lies within the line's height: tolerant of slight skew.
        if last is not None and abs(box.middle - last[-1].middle) < _height(last) / 2:
            last.append(box)
        else:
            rows.append([box])
    out: list[str] = []
    for previous, row in zip([None, *rows], rows, strict=False):
        if previous is not None and _gap(previous, row) > _height(row):
            out.append("")
        out.append(" ".join(box.text for box in sorted(row, key=lambda b: b.left)))
    return out


def _height(row: list[_Box]) -> float:
    return max(1.0, sorted(b.bottom - b.top for b in row)[len(row) // 2])


def _gap(above: list[_Box], below: list[_Box]) -> float:
    return min(b.top for b in below) - max(b.bottom for b in above)


def _tessdata_dirs() -> list[str]:
    prefix = os.environ.get("TESSDATA_PREFIX")
    return [prefix, *_TESSDATA_DIRS] if prefix else list(_TESSDATA_DIRS)


def _tessdata() -> str | None:
    """The folder holding Tesseract's English model, if there is one."""
    return next((d for d in _tessdata_dirs() if pathlib.Path(d, "eng.traineddata").is_file()), None)
