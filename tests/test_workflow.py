"""The publishing workflow cannot run here, so validate it against GitHub's workflow schema (offline)."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest
import yaml

WORKFLOW = ".github/workflows/book.yml"


@pytest.fixture(scope="module")
def workflow(repo_root):
    # PyYAML reads the key `on` as True; GitHub reads it as the string "on".
    data = yaml.safe_load((repo_root / WORKFLOW).read_text())
    if True in data:
        data["on"] = data.pop(True)
    return data


def test_workflow_matches_github_schema(workflow):
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("github-workflows.json")
    schema = json.loads(schema_file.read_text())
    jsonschema.validate(workflow, schema)


def test_workflow_uses_the_readme_commands_and_publishes(workflow, repo_root):
    runs = [s.get("run", "") for s in workflow["jobs"]["build"]["steps"]]
    assert any(r.startswith("make test") for r in runs) and any(r.startswith("make book") for r in runs)
    uses = [s.get("uses", "") for job in workflow["jobs"].values() for s in job["steps"]]
    assert any(u.startswith("actions/upload-pages-artifact") for u in uses)
    assert any(u.startswith("actions/deploy-pages") for u in uses)
    assert any(u.startswith("actions/cache") for u in uses)
    readme = (repo_root / "README.md").read_text()
    assert "make book" in readme and "make test" in readme


def test_ci_runs_exactly_make_test(repo_root):
    lines = [ln.strip() for ln in (repo_root / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[-1] == "make test"
