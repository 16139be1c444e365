"""The VM's vCPUs: two by default, $RASTOS_VM_CPUS where several VMs share the cores (the boot tests
on two workers), `--cpus` over both; a bad value is refused naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuilder.vm import CPUS_VARIABLE, Firmware, VmOptions, qemu_argv
from rastos.errors import RastosError


def smp(options: VmOptions, tmp_path: Path) -> str:
    argv = qemu_argv(
        options, accel="tcg", firmware=Firmware(tmp_path / "code.fd", tmp_path / "vars.fd"),
        vars_file=tmp_path / "efivars", qmp_socket=tmp_path / "qmp.sock", status_socket=tmp_path / "status.sock",
        console=["-nographic"],
    )  # fmt: skip
    return argv[argv.index("-smp") + 1]


def test_two_vcpus_unless_the_environment_or_the_caller_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CPUS_VARIABLE, raising=False)
    (tmp_path / "disk.qcow2").touch()
    assert smp(VmOptions(image=tmp_path / "disk.qcow2"), tmp_path) == "2"
    monkeypatch.setenv(CPUS_VARIABLE, "1")
    assert smp(VmOptions(image=tmp_path / "disk.qcow2"), tmp_path) == "1"
    assert smp(VmOptions(image=tmp_path / "disk.qcow2", cpus=4), tmp_path) == "4"


@pytest.mark.parametrize("value", ["", "0", "two", "-1", "65", "1.5", "²"])
def test_a_bad_number_of_vcpus_is_refused_naming_the_variable(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPUS_VARIABLE, value)
    with pytest.raises(RastosError, match=rf"\$RASTOS_VM_CPUS is {value!r}, not a number of vCPUs"):
        VmOptions(image=Path("disk.qcow2"))
