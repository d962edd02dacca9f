"""Sessions: tests (the default CI run), lint, typecheck, docs, bench, crash, soak, durability."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

PYTHON = ["3.11", "3.12", "3.13"]


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite (what CI runs), on the Python that runs nox but in
    a virtualenv of the session's own (``.nox/tests``): running it installs
    nothing into the user's environment. Arguments go to pytest
    (`nox -s tests -- tests/test_cli.py -x`)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHON)
def tests_matrix(session: nox.Session) -> None:
    """The suite on every supported Python found on the machine."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "trio_drain", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "--diff", "trio_drain", "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """The section 9 benchmark: prints a table, writes bench-results/bench.json.

    `nox -s bench -- --quick --runs 1` for a fast look. Like every session,
    in a virtualenv of its own (``.nox/bench``).
    """
    session.install("-e", ".[test,bench]")
    session.run("python", "-m", "tests.benchmark", *session.posargs)


@nox.session
def crash(session: nox.Session) -> None:
    """The long crash loop: `trio-drain run` SIGKILLed many times (30 by
    default; `nox -s crash -- 50` for more), the broker killed now and then,
    every id accounted for."""
    kills = session.posargs[0] if session.posargs else "30"
    session.install("-e", ".[test]")
    session.run(
        "python",
        "-m",
        "pytest",
        "-s",
        "-k",
        "long_crash_loop",
        "tests/test_crashes.py",
        env={"TRIO_DRAIN_CRASH_LOOPS": kills},
    )


@nox.session
def soak(session: nox.Session) -> None:
    """Ten minutes of steady accepts and drains through a faulty broker,
    watching file descriptors, Trio tasks and memory (`-- --seconds N`)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "tests.soak", *session.posargs)


@nox.session
def durability(session: nox.Session) -> None:
    """The long durability check: about 1,800 accepts traced with strace, then
    power cuts simulated at 3,000 points of the trace (`nox -s durability --
    10000` for more; TRIO_DRAIN_DURABILITY_SEED=N for other cut points).
    Needs strace, and permission to ptrace."""
    cuts = session.posargs[0] if session.posargs else "3000"
    session.install("-e", ".[test]")
    session.run(
        "python",
        "-m",
        "pytest",
        "-s",
        "tests/test_durability.py",
        env={"TRIO_DRAIN_DURABILITY_CUTS": cuts, "TRIO_DRAIN_REQUIRE_STRACE": "1"},
    )


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, warnings as errors: docs/_build/html/index.html.

    `nox -s docs -- -E` rebuilds from scratch; other arguments go to sphinx-build.
    """
    session.install("-e", ".[docs]")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "html", *session.posargs, "docs", "docs/_build/html"
    )
