"""Default step scripts for each build style.

A recipe names a ``BuildStyle`` and may override any step; ``script(spec, step)`` is the
script that step runs: the recipe's own, else the style's default, else None (the step is
skipped). Scripts are POSIX sh, run with ``sh -eu`` in the build directory with the
environment of docs/sandbox.md (``DESTDIR``, ``JOBS``...). They are pure text: nothing here
looks at a source tree; what depends on it (is there a check target?) is decided by the
script when it runs.

Libraries go to /usr/lib on every style: cmake's GNUInstallDirs and meson would otherwise
pick lib64 or a Debian multiarch directory by looking at the build host.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from portsd.core.recipe import BuildSpec, BuildStep, BuildStyle

_NO_CHECK_RULE = "No rule to make target 'check'."
"""What make says when it has no rule for ``check`` itself (not for one of its
prerequisites: that reads "..., needed by 'check'.")."""


def _if_check_target(command: str, make_args: str = "") -> str:
    """``command`` when make has a rule for ``check``; otherwise a note.

    Make is asked, not the makefile read: the rule may come from an included file (a
    gnulib package's GNUmakefile includes the Makefile that has it). ``make -q``
    (question mode) runs no recipe line but those calling $(MAKE) (or marked ``+``), and
    ``MAKE=true`` turns those into no-ops: asking builds nothing, here or in a
    subdirectory (``make -n`` would run the sub-makes, in every directory). Only
    make's error for a missing ``check`` rule skips the step: any other (a prerequisite
    no rule makes) is left for ``command`` to report.
    """
    return (
        "status=0\n"
        f"why=$(LC_ALL=C make -q{make_args} MAKE=true check 2>&1 >/dev/null) || status=$?\n"
        'case "$status:$why" in\n'
        f"2:*\"{_NO_CHECK_RULE}\"*) echo 'no check target: skipping checks' ;;\n"
        f"*) {command} ;;\n"
        "esac"
    )


def default_script(
    style: BuildStyle, step: BuildStep, configure_args: Sequence[str] = ()
) -> str | None:
    """The style's script for ``step`` (None: the style does nothing in that step).

    ``configure_args`` (the recipe's, shell-quoted here) go to ./configure, cmake's or
    meson's setup, or, for the make style, to every make command.
    """
    args = "".join(" " + shlex.quote(arg) for arg in configure_args)
    match style, step:
        case BuildStyle.AUTOTOOLS, BuildStep.BUILD:
            return f"./configure --prefix=/usr{args}\nmake"
        case BuildStyle.AUTOTOOLS, BuildStep.CHECK:
            return _if_check_target("make check")
        case BuildStyle.AUTOTOOLS, BuildStep.PACKAGE:
            return 'make DESTDIR="$DESTDIR" install'
        case BuildStyle.CMAKE, BuildStep.BUILD:
            return (
                "cmake -S . -B build -DCMAKE_INSTALL_PREFIX=/usr -DCMAKE_INSTALL_LIBDIR=lib"
                f" -DCMAKE_BUILD_TYPE=Release{args}\n"
                'cmake --build build --parallel "$JOBS"'
            )
        case BuildStyle.CMAKE, BuildStep.CHECK:
            return (
                "if [ -f build/CTestTestfile.cmake ]; then\n"
                '\t(cd build && ctest --output-on-failure --parallel "$JOBS")\n'
                "else\n"
                "\techo 'no tests: skipping checks'\n"
                "fi"
            )
        case BuildStyle.CMAKE, BuildStep.PACKAGE:
            return 'DESTDIR="$DESTDIR" cmake --install build'
        case BuildStyle.MESON, BuildStep.BUILD:
            return (
                f"meson setup build --prefix=/usr --libdir=lib --buildtype=release{args}\n"
                'meson compile -C build -j "$JOBS"'
            )
        case BuildStyle.MESON, BuildStep.CHECK:
            return 'meson test -C build --print-errorlogs --num-processes "$JOBS"'
        case BuildStyle.MESON, BuildStep.PACKAGE:
            return 'meson install -C build --no-rebuild --destdir "$DESTDIR"'
        case BuildStyle.MAKE, BuildStep.BUILD:
            return f"make PREFIX=/usr{args}"
        case BuildStyle.MAKE, BuildStep.CHECK:
            return _if_check_target(f"make PREFIX=/usr{args} check", f" PREFIX=/usr{args}")
        case BuildStyle.MAKE, BuildStep.PACKAGE:
            return f'make DESTDIR="$DESTDIR" PREFIX=/usr{args} install'
    return None


def script(spec: BuildSpec, step: BuildStep) -> str | None:
    """What ``step`` runs for a recipe's ``[build]``: its own script, else the style's."""
    own = spec.script(step)
    if own is not None:
        return own
    return default_script(spec.style, step, spec.configure_args)
