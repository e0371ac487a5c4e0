"""Real PDFs for the upload tests, written with fpdf2 (requirements-test.txt) instead of committed fixtures."""

from __future__ import annotations

import io
from pathlib import Path


def write_pdf(path: Path, pages: list[str]) -> Path:
    """A PDF with one page per string (Helvetica: latin-1 text), wrapped by fpdf2 like a real document."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 5, text)
    path.write_bytes(bytes(pdf.output()))
    return path


def write_image_only_pdf(path: Path) -> Path:
    """A page with drawings and no text layer, as a scan has."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.rect(20, 20, 120, 80, style="F")
    pdf.circle(80, 150, 30)
    path.write_bytes(bytes(pdf.output()))
    return path


def encrypt_pdf(source: Path, path: Path, user_password: str, algorithm: str = "AES-256") -> Path:
    """`source` encrypted by pypdf; an empty user password opens without one (an owner password is set)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(source))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    path.write_bytes(out.getvalue())
    return path
