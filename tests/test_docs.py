"""The docs a newcomer reads live in the repository and agree with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.factories import auth

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def operations() -> set[str]:
    document = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    return {f"{method.upper()} {path}" for path, ops in document["paths"].items() for method in ops}


def test_the_api_guide_lists_every_operation_and_no_other() -> None:
    listed = set(re.findall(r"^\| `([A-Z]+ [^`]+)` \|", (DOCS / "api.md").read_text(), flags=re.M))
    assert listed == operations(), {"missing": operations() - listed, "unknown": listed - operations()}


def test_the_readme_and_docs_stand_alone() -> None:
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = page.read_text()
        assert "../shared" not in text, f"{page.name} points outside the repository"
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not link.startswith(("http://", "https://", "mailto:")):
                assert (page.parent / link).exists(), f"{page.name} links to a missing {link}"
                assert not ignored(page.parent / link), f"{page.name} links to {link}, which git ignores"


def ignored(path: Path) -> bool:
    """Whether git would leave the file out of a commit (so a clean clone would not have it)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return False
    done = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, check=False)
    return done.returncode == 0


@pytest.mark.anyio
async def test_the_codebook_example_creates_a_study(admin: httpx.AsyncClient) -> None:
    text = (DOCS / "codebook.md").read_text()
    example = json.loads(text.split("## A minimal example", 1)[1].split("```json", 1)[1].split("```", 1)[0])
    r = await admin.post("/api/v1/studies", headers=auth(ADMIN_TOKEN),
                         json={"key": "craving", "name": "Craving", "timezone": "UTC", "codebook": example})
    assert r.status_code == 201, r.text
    waves = (await admin.get("/api/v1/studies/craving/waves", headers=auth(ADMIN_TOKEN))).json()["items"]
    assert [w["key"] for w in waves] == ["intake", "followup"]


@pytest.mark.anyio
async def test_the_interactive_docs_need_no_internet(app_client: httpx.AsyncClient) -> None:
    page = await app_client.get("/docs")
    assert page.status_code == 200 and "cdn." not in page.text
    for asset in re.findall(r'(?:src|href)="(/docs-assets/[^"]+)"', page.text):
        served = await app_client.get(asset)
        assert served.status_code == 200 and len(served.content) > 100, asset
    assert "/docs-assets/swagger-ui-bundle.js" in page.text


@pytest.mark.anyio
async def test_the_first_sessions_import_example_enrols(admin: httpx.AsyncClient) -> None:
    text = (DOCS / "api.md").read_text()
    example = text.split("participants:import -d '", 1)[1].split("'", 1)[0]
    r = await admin.post("/api/v1/studies", headers=auth(ADMIN_TOKEN),
                         json={"key": "demo", "name": "PAL demo", "timezone": "America/New_York",
                               "template": "pal-replication"})
    assert r.status_code == 201, r.text
    r = await admin.post("/api/v1/studies/demo/participants:import", content=example.encode(),
                         headers={**auth(ADMIN_TOKEN), "content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["created"] == len(json.loads(example)) == 2 and r.json()["errors"] == []
