"""Job templates and their JDL, within the limits of DIRAC's JDL parser.

DIRAC's ``ClassAd`` parser drops every ``"`` inside a string value, cuts a value at the first ``;``,
starts a nested ad at ``[``, and strips blanks from list items; the job wrapper runs
``Executable + " " + Arguments`` through ``sh``. So arguments are quoted with single quotes
(``'`` itself as ``'\\''``), and a value that cannot survive is refused with a :class:`JDLError`.
Values of ``environment`` go to ``ExecutionEnvironment`` percent-encoded (the job wrapper
URL-unquotes them), so anything can be carried there — but they are visible in the JDL; secrets
belong in a :class:`dirac_submit.credentials.SecretIssuer`, never here::

    template = JobTemplate(
        command=["mqexec", "worker", "--concurrency", "4"],
        image="/cvmfs/unpacked.cern.ch/registry.hub.docker.com/me/worker:1",
        sites=["LCG.CERN.cern"], processors=4, tags=["GPU"],
        environment={"MQEXEC_LOG": "info"},
    )
    print(template.to_jdl(count=10))      # one parametric JDL for 10 jobs
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from .errors import JDLError

_BARE_ARG = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_EXECUTABLE = re.compile(r"[A-Za-z0-9_+.:/-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PARAMETRIC_MARK = re.compile(r"%[nsj(]")
_WHY = {
    '"': "DIRAC's JDL parser deletes every '\"' in a value",
    ";": "DIRAC's JDL parser ends a value at the first ';'",
    "[": "DIRAC's JDL parser reads '[' as the start of a nested description",
}
_HINT = "pass such text through environment= (percent-encoded there) or ship it in a script"


@dataclass(frozen=True)
class JobTemplate:
    """What every job of a pool runs, and where.

    Args:
        command: the payload argv, e.g. ``["mqexec", "worker"]``.
        name: ``JobName``; parametric jobs get ``_<index>`` appended.
        sites: ``Site`` — DIRAC site names the jobs may run at (empty: anywhere).
        processors: ``NumberOfProcessors``.
        tags: ``Tags`` the site must offer, e.g. ``["GPU"]``.
        image: an Apptainer image; when set the payload runs as ``apptainer exec --bind <binds> <image> ...``.
        binds: paths bound into the container.
        environment: public environment values for the payload (``ExecutionEnvironment``).
        output_sandbox: files brought back with the job (stdout/stderr by default).
    """

    command: Sequence[str]
    name: str = "dirac_submit"
    sites: Sequence[str] = ()
    processors: int = 1
    tags: Sequence[str] = ()
    image: str | None = None
    binds: Sequence[str] = ("/cvmfs",)
    environment: Mapping[str, str] = field(default_factory=dict)
    output_sandbox: Sequence[str] = ("std.out", "std.err")

    def argv(self) -> list[str]:
        """The command the job runs, with the Apptainer wrapper when ``image`` is set::

        JobTemplate(["true"], image="img.sif").argv()
        # ['apptainer', 'exec', '--bind', '/cvmfs', 'img.sif', 'true']
        """
        if not self.command:
            raise JDLError("JobTemplate.command is empty: give the payload argv, e.g. ['mqexec', 'worker']")
        if self.image is None:
            return list(self.command)
        binds = [arg for path in self.binds for arg in ("--bind", path)]
        return ["apptainer", "exec", *binds, self.image, *self.command]

    def to_jdl(self, count: int = 1, extra_environment: Mapping[str, str] | None = None) -> str:
        """Render the JDL: one job, or one parametric description of ``count`` jobs.

        Args:
            count: number of jobs; > 1 gives ``Parameters = count`` (DIRAC expands it server side).
            extra_environment: values added to ``environment`` for this submission only
                (e.g. short-lived credentials from a :class:`~dirac_submit.credentials.SecretIssuer`).

        Raises:
            JDLError: a value cannot be represented.
        """
        if count < 1:
            raise JDLError(f"count must be >= 1, got {count}")
        if self.processors < 1:
            raise JDLError(f"processors must be >= 1, got {self.processors}")
        executable, *arguments = self.argv()
        if not _EXECUTABLE.fullmatch(executable):
            raise JDLError(
                f"Executable {executable!r}: DIRAC puts it unquoted in a shell command, so it may only "
                "contain letters, digits and _+.:/-"
            )
        name = _string("JobName", self.name)
        lines = [
            ("Executable", f'"{executable}"'),
            ("Arguments", f'"{_string("Arguments", " ".join(_shell_quote(a) for a in arguments))}"'),
            ("JobName", f'"{name}_%n"' if count > 1 else f'"{name}"'),
            ("StdOutput", '"std.out"'),
            ("StdError", '"std.err"'),
            ("OutputSandbox", _list("OutputSandbox", self.output_sandbox)),
            ("NumberOfProcessors", str(self.processors)),
        ]
        if self.sites:
            lines.append(("Site", _list("Site", self.sites)))
        if self.tags:
            lines.append(("Tags", _list("Tags", self.tags)))
        environment = {**self.environment, **(extra_environment or {})}
        if environment:
            lines.append(("ExecutionEnvironment", _list("ExecutionEnvironment", _environment(environment))))
        if count > 1:
            for key, value in lines:
                if key != "JobName" and _PARAMETRIC_MARK.search(value):
                    raise JDLError(
                        f"{key} contains '%n', '%s', '%j' or '%(' which DIRAC substitutes in parametric "
                        "jobs; submit one by one (parametric=False) or avoid these sequences"
                    )
            lines += [("Parameters", str(count)), ("ParameterStart", "0"), ("ParameterStep", "1")]
        return "[\n" + "".join(f"    {key} = {value};\n" for key, value in lines) + "]"


def _shell_quote(arg: str) -> str:
    if _BARE_ARG.fullmatch(arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def _string(key: str, value: str) -> str:
    for char, why in _WHY.items():
        if char in value:
            raise JDLError(f"{key} {value!r} contains {char!r}: {why}; {_HINT}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise JDLError(f"{key} {value!r} contains a control character (newline?) the JDL cannot carry; {_HINT}")
    return value


def _list(key: str, items: Sequence[str]) -> str:
    if isinstance(items, str):
        raise JDLError(f"{key} must be a list of strings, not the string {items!r}")
    for item in items:
        _string(key, item)
        if not item or re.search(r"[\s,{}]", item):
            raise JDLError(f"{key} item {item!r}: list items must be non-empty without blanks, ',' '{{' '}}'")
    return "{" + ", ".join(f'"{item}"' for item in items) + "}"


def _environment(environment: Mapping[str, str]) -> list[str]:
    for name in environment:
        if not _ENV_NAME.fullmatch(name):
            raise JDLError(f"environment name {name!r} is not a valid variable name")
    return [f"{name}={quote(str(value), safe='')}" for name, value in environment.items()]
