"""The documents stay true to the code: README stays short and its test command is CI's, every setting the
code reads is in docs/configuration.md, and every relative link (and #anchor) in README.md and docs/ resolves.

The examples in README.md and docs/clients.md are run by tests/clients/test_readme_examples.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from .server import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Pages other issues' branches add; README and docs/ link to them already. An entry must go once its page exists.
PENDING: set[str] = set()  # dialects.md arrived with issue 18


def test_readme_is_short_and_its_test_command_is_what_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = re.findall(r"^```bash\n(python3 -m venv .*?)\n```", text, flags=re.M)
    assert len(commands) == 2 and "gunicorn -c gunicorn.conf.py wsgi:app" in commands[0]
    assert commands[1] in ci  # .ci/run runs README's test command exactly as written


def test_every_setting_the_code_reads_is_documented():
    documented = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    read = set()
    for source in (ROOT / "embedapi" / "config.py", ROOT / "gunicorn.conf.py"):
        read |= set(re.findall(r"\b(?:EMBEDAPI_[A-Z_]+[A-Z]|APP_PORT)\b", source.read_text(encoding="utf-8")))
    read -= {"EMBEDAPI_OWNS_METRICS_DIR"}  # internal: gunicorn.conf.py's note to itself across a SIGHUP
    assert len(read) >= 25
    missing = sorted(name for name in read if f"`{name}`" not in documented)
    assert not missing, f"docs/configuration.md does not describe {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters of any script kept), spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_pending_pages_are_still_pending():
    arrived = sorted(p for p in PENDING if (ROOT / p).exists())
    assert not arrived, f"{arrived} exist now: remove them from PENDING in {__file__}"


def test_every_relative_link_resolves():
    broken = []
    for page in [README, *DOCS]:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        text = re.sub(r"`[^`\n]*`", "", text)  # code spans show link syntax, they are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute URL
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            name = str(file.relative_to(ROOT)) if file.is_relative_to(ROOT) else str(file)
            if not file.exists():
                if name not in PENDING:
                    broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
