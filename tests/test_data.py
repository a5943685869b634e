"""The texts the tool ships: present in the package, unchanged, and the defaults every stage reads."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from d2m_gguf import data

PACKAGE = Path(data.__file__).resolve().parent


def _sha256_in_readme(name: str) -> str:
    row = next(line for line in (PACKAGE / "data" / "README.md").read_text().splitlines() if f"`{name}`" in line)
    return re.search(r"`([0-9a-f]{64})`", row).group(1)


def test_shipped_texts_match_their_recorded_hashes():
    for path in (data.DEFAULT_CALIBRATION, data.DEFAULT_EVAL):
        assert path.parent == PACKAGE / "data", f"{path} is not shipped inside the package"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == _sha256_in_readme(path.name), path


def test_the_package_reads_nothing_beside_the_checkout():
    """A clone or an install has no ../shared: no module may reach for it."""
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if re.search(r"\.\./shared|\"shared\" / ", p.read_text())]
    assert not offenders, f"modules reading ../shared: {offenders}"


def test_package_data_declares_the_texts():
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert '"data/*.txt"' in pyproject
