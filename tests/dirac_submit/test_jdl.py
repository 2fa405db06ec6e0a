"""JobTemplate → JDL: what DIRAC's parser and job wrapper will see, and what must be refused."""

from __future__ import annotations

import shlex
import subprocess
from urllib.parse import unquote

import pytest
from tornado_contract_server import parse_jdl

from dirac_submit import JDLError, JobTemplate


def test_jdl_attributes_survive_diracs_parser() -> None:
    template = JobTemplate(
        ["mqexec", "worker", "--concurrency", "4"],
        name="workers",
        sites=["LCG.CERN.cern", "LCG.RAL.uk"],
        processors=4,
        tags=["GPU"],
        environment={"MQEXEC_LOG": "info"},
    )
    attrs = parse_jdl(template.to_jdl())
    assert attrs["Executable"] == "mqexec"
    assert attrs["Arguments"] == "worker --concurrency 4"
    assert attrs["JobName"] == "workers"
    assert attrs["Site"] == ["LCG.CERN.cern", "LCG.RAL.uk"]
    assert attrs["NumberOfProcessors"] == "4"
    assert attrs["Tags"] == ["GPU"]
    assert attrs["OutputSandbox"] == ["std.out", "std.err"]
    assert attrs["ExecutionEnvironment"] == ["MQEXEC_LOG=info"]
    assert "Parameters" not in attrs


def test_parametric_jdl_names_each_job() -> None:
    attrs = parse_jdl(JobTemplate(["true"], name="w").to_jdl(count=12))
    assert (attrs["Parameters"], attrs["ParameterStart"], attrs["ParameterStep"]) == ("12", "0", "1")
    assert attrs["JobName"] == "w_%n"


def test_apptainer_wrapper() -> None:
    template = JobTemplate(["mqexec", "worker"], image="/cvmfs/unpacked.cern.ch/img:1", binds=["/cvmfs", "/data"])
    assert template.argv() == [
        "apptainer",
        "exec",
        "--bind",
        "/cvmfs",
        "--bind",
        "/data",
        "/cvmfs/unpacked.cern.ch/img:1",
        "mqexec",
        "worker",
    ]
    assert parse_jdl(template.to_jdl())["Executable"] == "apptainer"


@pytest.mark.parametrize(
    "argv",
    [
        ["python3", "-c", "print(__import__('os').getcwd())"],
        ["echo", "two words", "it's", "$HOME", "`id`", "a|b", "*", ""],
    ],
)
def test_arguments_reach_the_payload_unchanged(argv: list[str]) -> None:
    attrs = parse_jdl(JobTemplate(argv).to_jdl())
    assert shlex.split(attrs["Arguments"]) == argv[1:]
    # The job wrapper runs Executable + " " + Arguments through sh: check sh sees the same argv.
    shown = subprocess.run(
        "python3 -c 'import sys; print(sys.argv[1:])' " + attrs["Arguments"],
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.strip() == repr(argv[1:])


def test_environment_values_are_percent_encoded() -> None:
    value = 'amqps://u:p@host/vh?x=1;y="2", {z}'
    [item] = parse_jdl(JobTemplate(["true"], environment={"URL": value}).to_jdl())["ExecutionEnvironment"]
    name, encoded = item.split("=", 1)
    assert (name, unquote(encoded)) == ("URL", value)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (JobTemplate(["python3", "-c", "import os; print(1)"]), "contains ';'"),
        (JobTemplate(["echo", 'say "hi"']), "contains '\"'"),
        (JobTemplate(["echo", "a[0]"]), "contains '\\['"),
        (JobTemplate(["echo", "two\nlines"]), "control character"),
        (JobTemplate(["my prog"]), "Executable 'my prog'"),
        (JobTemplate([]), "command is empty"),
        (JobTemplate(["true"], name='my "job"'), "JobName"),
        (JobTemplate(["true"], sites=["LCG.CERN.cern, LCG.RAL.uk"]), "Site item"),
        (JobTemplate(["true"], sites="LCG.CERN.cern"), "must be a list"),
        (JobTemplate(["true"], environment={"1BAD": "x"}), "not a valid variable name"),
        (JobTemplate(["true"], processors=0), "processors must be >= 1"),
    ],
)
def test_unrepresentable_values_are_refused_clearly(template: JobTemplate, message: str) -> None:
    with pytest.raises(JDLError, match=message):
        template.to_jdl()


def test_parametric_placeholders_in_user_values_are_refused() -> None:
    template = JobTemplate(["printf", "%s"])
    assert parse_jdl(template.to_jdl())["Arguments"] == "%s"
    with pytest.raises(JDLError, match="substitutes in parametric jobs"):
        template.to_jdl(count=2)
