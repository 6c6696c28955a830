"""Sessions that CI and people both use: tests, lint, typecheck."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    session.install(TORCH, "-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def thorough(session: nox.Session) -> None:
    """The property tests with ten times the examples and lengths past the 128-row blocks."""
    session.install(TORCH, "-e", ".[test]")
    session.run(
        "python", "-m", "pytest", "-q", *session.posargs, env={"HYPOTHESIS_PROFILE": "thorough"}
    )


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    paths = ["dilattn", "tests", "examples", "benchmarks", "noxfile.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(TORCH, "-e", ".[test]", "mypy")
    session.run("mypy")
