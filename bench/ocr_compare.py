"""OCR engines side by side on rendered pages of known text: accuracy, pages/s, peak memory.

`python -m bench.ocr_compare [--pages N]`, or the `ocr` phase of `python -m bench.run`. Not
part of the test suite. Two real PDFs of the same English prose (four paragraphs a page) are
built with fpdf2: body text in Helvetica and Times at 10-12 pt with a text layer, and small
print (6-7 pt) as an image-only scan (300 DPI, skewed, blurred, noisy, JPEG). Each engine, at
each DPI, reads every page through Sluice's own path (`stages.formats.ocr`: render with
pypdfium2, grey, OCR, clean) in a subprocess of its own, pinned to one core with one thread as
the parse stage runs it, so its peak RSS is its own. Word recall is the share of the known
words (lowercase, punctuation dropped, counted with multiplicity) found in the output; CER is
the edit distance between the texts (whitespace collapsed) over the known length. Rows for the
Tesseract command line (pytesseract) and for RapidOCR with its default angle classifier show
what the product's choices were weighed against. On a shared machine read `cpu_s_per_page`
beside `pages_per_s`: it moves far less with other load.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
from fpdf import FPDF

REPO = Path(__file__).resolve().parent.parent
DPIS = (150, 200)
# Sluice's two, and for comparison: tesseract-cli, the same Tesseract through its command line
# (pytesseract, one process per page); rapidocr-cls, RapidOCR with its angle classifier on.
ENGINES = ("tesseract", "tesseract-cli", "rapidocr", "rapidocr-cls")
# What the parse stage's worker sees: one thread, whatever library reads the variable.
ONE_THREAD = {"OMP_THREAD_LIMIT": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# Body text, and the small print (footnotes, tables, terms) that a scan makes hardest to read.
FONTS = (("Helvetica", 11), ("Times", 12), ("Helvetica", 10), ("Times", 11))
SMALL_FONTS = (("Helvetica", 6), ("Times", 7), ("Helvetica", 7), ("Times", 6))
# A desk scanner's page: 300 DPI, a little skew and blur, sensor noise, JPEG-compressed.
SCAN_DPI, SCAN_SKEW_DEG, SCAN_BLUR_PX, SCAN_NOISE, SCAN_JPEG_QUALITY = 300, 0.7, 1.0, 25.0, 50
PROSE = """
The harbour master opened the ledger at seven o'clock and counted the ships that had arrived
overnight. Three fishing boats, a cargo vessel from Rotterdam and a small yacht were moored
along the eastern quay. He wrote each name in careful capitals and noted the tonnage beside it.
---
Winter came early to the valley that year. By the middle of November the river was frozen
near its banks, and the children of the village skated on the millpond every afternoon while
their parents gathered firewood from the forest above the orchard.
---
The quarterly report shows revenue of 4.2 million euros, an increase of 12 percent on the same
period last year. Most of the growth came from the northern region, where two new warehouses
opened in March and the delivery network was extended to forty smaller towns.
---
Before the meeting, the council published a summary of the proposed railway station. The new
building would have four platforms, a covered bicycle park for 600 bicycles and a bus terminal
on the western side, so that passengers could change between services without crossing a road.
---
Copper conducts heat and electricity very well, which is why it has been used for cooking pots,
roofs and electrical wiring for centuries. When exposed to the weather for many years, it
slowly develops a green patina that protects the metal underneath from further corrosion.
---
The museum's new exhibition traces the history of the printing press from the fifteenth century
to the present day. Visitors can watch a working replica of an early wooden press and try
setting a line of metal type by hand under the guidance of a trained volunteer.
---
Patients are asked to arrive at the clinic fifteen minutes before their appointment and to
bring a list of any medicines they take. The reception desk is open from 8:30 to 17:00 on
weekdays, and urgent questions outside those hours should be directed to the hospital.
---
A gentle slope of golden meadow led down to the lake, where an old wooden boathouse leaned
towards the water. Every summer the family rented it for two weeks, and the grandfather told
the same stories about the storm of 1962 that had carried away half of the jetty.
---
The supplier confirmed that the invoice had been paid on 3 June, but the payment did not
appear in the account until the following week. After checking the transfer, the bank found
that a single digit in the reference number had been entered incorrectly by the clerk.
---
Glaciers form where more snow falls in winter than melts in summer. Over hundreds of years the
snow is compressed into dense ice, which begins to flow slowly downhill under its own weight,
carving deep valleys and carrying rocks and gravel far from where they started.
---
The library will close for renovation from the first of August. During the closure, members
can borrow books from the mobile library, which will visit the market square every Tuesday
and Friday morning, and return items to any branch in the district without a fine.
---
A careful cook measures the flour, sugar and butter before starting, because a cake that is
missing one ingredient cannot be rescued halfway through. The oven should be heated to 180
degrees, and the tin lined with paper so that the sponge comes out cleanly when it is done.
"""
PARAGRAPHS = [" ".join(p.split()) for p in PROSE.split("---")]
PARAGRAPHS_PER_PAGE = 4


def page_texts(pages: int) -> list[list[str]]:
    """The paragraphs of each page: four a page, taken in turn from the prose above."""
    return [
        [PARAGRAPHS[(page * 5 + n) % len(PARAGRAPHS)] for n in range(PARAGRAPHS_PER_PAGE)]
        for page in range(pages)
    ]


def make_known_pdf(texts: list[list[str]], fonts: tuple[tuple[str, int], ...] = FONTS) -> bytes:
    """A PDF with one page per paragraph list, each page in the next of `fonts`."""
    pdf = FPDF(format="A4")
    pdf.set_margins(20, 20)
    # An overflowing page would add a page the known text does not have.
    pdf.set_auto_page_break(False)
    for index, paragraphs in enumerate(texts):
        family, size = fonts[index % len(fonts)]
        pdf.set_font(family, size=size)
        pdf.add_page()
        pdf.set_xy(20, 20)
        for paragraph in paragraphs:
            pdf.multi_cell(170, size * 0.5, paragraph)
            pdf.ln(size * 0.5)
        if pdf.get_y() > 277:
            raise RuntimeError(f"page {index + 1}'s text runs off the page")
    return bytes(pdf.output())


def make_scan(pdf: bytes) -> bytes:
    """An image-only PDF of `pdf`'s pages as a desk scanner would make them (seeded noise)."""
    import pypdfium2 as pdfium
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(1729)
    out = FPDF(format="A4")
    source = pdfium.PdfDocument(pdf)
    for index in range(len(source)):
        page = source[index]
        image = page.render(scale=SCAN_DPI / 72, grayscale=True).to_pil()
        page.close()
        image = image.rotate(SCAN_SKEW_DEG, resample=Image.Resampling.BICUBIC, fillcolor=255)
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(SCAN_BLUR_PX)), np.float32)
        pixels += rng.normal(0.0, SCAN_NOISE, pixels.shape).astype(np.float32)
        jpeg = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            jpeg, format="JPEG", quality=SCAN_JPEG_QUALITY
        )
        out.add_page()
        out.image(jpeg, x=0, y=0, w=out.w, h=out.h)
    source.close()
    return bytes(out.output())


def words(text: str) -> list[str]:
    """Lowercase words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", text.lower())


def word_recall(known: str, read: str) -> float:
    """The share of `known`'s words (with multiplicity) that `read` has."""
    want, got = collections.Counter(words(known)), collections.Counter(words(read))
    return sum(min(n, got[w]) for w, n in want.items()) / max(1, sum(want.values()))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, one row of the table at a time in numpy."""
    if not a or not b:
        return len(a) + len(b)
    target = np.array([ord(c) for c in b])
    columns = np.arange(len(b) + 1)
    row = columns.copy()
    for i, char in enumerate(a, 1):
        current = np.empty_like(row)
        current[0] = i
        current[1:] = np.minimum(row[:-1] + (target != ord(char)), row[1:] + 1)
        # Insertions chain along the row: a running minimum of (value - column) does them all.
        row = np.minimum.accumulate(current - columns) + columns
    return int(row[-1])


def cer(known: str, read: str) -> float:
    """Character error rate of `read` against `known`, whitespace collapsed."""
    a, b = " ".join(known.split()), " ".join(read.split())
    return edit_distance(a, b) / max(1, len(a))


def _memory_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class _TesseractCli:
    """Tesseract through its command line (pytesseract), as many projects run it."""

    def __init__(self) -> None:
        import pytesseract

        self.run = pytesseract.image_to_string

    def read(self, image: Any) -> str:
        return str(self.run(image, lang="eng", config="--psm 3"))


def worker(engine: str, dpi: int, pdf: Path, pages: int) -> dict[str, Any]:
    """In the subprocess: load `engine`, read every page, say what it read and what it cost."""
    # One core, as one sandbox worker of the parse stage gets at most.
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    from stages.formats.ocr import OcrReader, _RapidOcr, ocr_image, ocr_reader, render_pdf_page

    started = time.perf_counter()
    reader: OcrReader
    if engine == "tesseract-cli":
        reader = _TesseractCli()
    elif engine == "rapidocr-cls":
        # The same model, read as RapidOCR reads by default.
        reader = _RapidOcr(cast(_RapidOcr, ocr_reader("rapidocr")).model, use_cls=True)
    else:
        reader = ocr_reader(engine)
    load_s = time.perf_counter() - started
    # A first page warms caches (and ONNX Runtime's allocations); the timed pass reads all.
    ocr_image(render_pdf_page(pdf, 1, dpi), reader)
    texts: list[str] = []
    started, cpu_started = time.perf_counter(), _cpu_s()
    for page in range(1, pages + 1):
        image = render_pdf_page(pdf, page, dpi)
        texts.append(ocr_image(image, reader))
        image.close()
    wall_s, cpu_s = time.perf_counter() - started, _cpu_s() - cpu_started
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "texts": texts,
        "load_s": load_s,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "rss_mb": _memory_mb("VmHWM"),
        "children_rss_mb": children_mb,
        "vm_peak_mb": _memory_mb("VmPeak"),
    }


def _cpu_s() -> float:
    # The tesseract CLI's pages are read in child processes: their CPU counts too.
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def available_engines() -> list[str]:
    """The engines of `ENGINES` installed here."""
    from stages.formats.ocr import engine_available

    out = [e for e in ("tesseract", "rapidocr") if engine_available(e) is None]
    if importlib.util.find_spec("pytesseract") is not None and shutil.which("tesseract"):
        out.insert(1, "tesseract-cli")
    if "rapidocr" in out:
        out.append("rapidocr-cls")
    return out


def compare(pages: int) -> list[dict[str, object]]:
    """One row per document, engine and DPI: word_recall, pages_per_s, peak_rss_mb and more."""
    texts = page_texts(pages)
    known = ["\n\n".join(paragraphs) for paragraphs in texts]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="sluice-ocr-bench-") as tmp:
        documents = {
            "10-12pt": Path(tmp, "body.pdf"),
            "6-7pt scan": Path(tmp, "small-print-scan.pdf"),
        }
        documents["10-12pt"].write_bytes(make_known_pdf(texts))
        documents["6-7pt scan"].write_bytes(make_scan(make_known_pdf(texts, SMALL_FONTS)))
        for document, pdf in documents.items():
            for engine in available_engines():
                if engine == "rapidocr-cls" and document != "10-12pt":
                    continue  # it only shows why the classifier is off; once is enough
                for dpi in DPIS:
                    run = _run_worker(engine, dpi, pdf, pages)
                    rows.append({"document": document, **_row(engine, dpi, known, run)})
                    print(_line(rows[-1]), flush=True)
    return rows


def _row(engine: str, dpi: int, known: list[str], run: dict[str, Any]) -> dict[str, object]:
    read: list[str] = run["texts"]
    pages = len(known)
    return {
        "engine": engine,
        "dpi": dpi,
        "word_recall": round(word_recall(" ".join(known), " ".join(read)), 4),
        "worst_page_recall": round(
            min(word_recall(k, r) for k, r in zip(known, read, strict=True)), 4
        ),
        "cer": round(cer(" ".join(known), " ".join(read)), 4),
        "pages_per_s": round(pages / run["wall_s"], 3),
        "cpu_s_per_page": round(run["cpu_s"] / pages, 3),
        "load_s": round(run["load_s"], 2),
        # The CLI's child process runs while this one waits, holding its memory.
        "peak_rss_mb": round(run["rss_mb"] + run["children_rss_mb"], 1),
        "children_rss_mb": round(run["children_rss_mb"], 1),
        "vm_peak_mb": round(run["vm_peak_mb"], 1),
    }


def _run_worker(engine: str, dpi: int, pdf: Path, pages: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.ocr_compare", "--worker", engine, "--dpi", str(dpi)]
    command += ["--pdf", str(pdf), "--pages", str(pages)]
    done = subprocess.run(
        command,
        cwd=REPO,
        env=os.environ | ONE_THREAD,
        capture_output=True,
        text=True,
        check=False,
        timeout=600 + 60 * pages,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{engine} at {dpi} DPI failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


COLUMNS = (
    "document",
    "engine",
    "dpi",
    "word_recall",
    "worst_page_recall",
    "cer",
    "pages_per_s",
    "cpu_s_per_page",
    "load_s",
    "peak_rss_mb",
    "children_rss_mb",
    "vm_peak_mb",
)


def _line(row: dict[str, object]) -> str:
    return "| " + " | ".join(str(row[c]) for c in COLUMNS) + " |"


def table(rows: list[dict[str, object]]) -> str:
    """The rows as a Markdown table."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return "\n".join([head, *(_line(row) for row in rows)])


def main() -> None:
    """Measure every installed engine at each DPI and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=6)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--dpi", type=int, default=DPIS[-1], help=argparse.SUPPRESS)
    parser.add_argument("--pdf", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dpi, args.pdf, args.pages)))
        return
    print(
        f"{args.pages} A4 pages, {PARAGRAPHS_PER_PAGE} paragraphs each, twice: text in "
        f"{FONTS} rendered clean, and in {SMALL_FONTS} scanned ({SCAN_DPI} DPI, "
        f"{SCAN_SKEW_DEG} degree skew, blur {SCAN_BLUR_PX} px, noise sd {SCAN_NOISE}, JPEG "
        f"quality {SCAN_JPEG_QUALITY}); "
        f"({len(words(' '.join(' '.join(p) for p in page_texts(args.pages))))} words); "
        f"one core, one thread per engine; cores here {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = compare(args.pages)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
