"""mountscripts/: the boot, stop, debug-mount and CI-container scripts and the
systemd units, linted, dry-run, and run for real on a device-like root.

The scripts find compatfs through $COMPATFS; here it is this venv's console
script, and every run uses a --run-dir under tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compatfs import mounts
from compatfs.rundir import RunDir
from compatfs.testing import devicegen

from .conftest import REPO
from .devices import device_root
from .mounting import teardown

SCRIPTS_DIR = REPO / "mountscripts"
SYSTEMD_DIR = SCRIPTS_DIR / "systemd"
SH_SCRIPTS = ("compatfs-boot", "compatfs-stop", "compatfs-debug-mount")
BASH_SCRIPTS = ("compatfs-ci-container",)
VIEWS = ("img", "downloads")
#: views of a supervised device must answer again within this after a SIGKILL
RECOVERY_LIMIT_S = 5.0


def compatfs_command() -> str:
    """The compatfs console script of the Python running the tests."""
    beside = Path(sys.executable).parent / "compatfs"
    found = str(beside) if beside.exists() else shutil.which("compatfs")
    assert found, "no compatfs console script next to the test interpreter or on PATH"
    return found


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COMPATFS_DEBUG", None)
    env.pop("COMPATFS_RUN_DIR", None)
    env["COMPATFS"] = compatfs_command()
    env.update(extra)
    return env


def run(name: str, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60, shell: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*shell, str(SCRIPTS_DIR / name), *args], capture_output=True,
                          text=True, env=env or script_env(), timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_line_error(proc: subprocess.CompletedProcess[str], prog: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]


# -- lint, help, usage errors --------------------------------------------------------

@pytest.mark.parametrize("name", SH_SCRIPTS + BASH_SCRIPTS)
def test_script_is_executable_with_the_right_interpreter(name):
    path = SCRIPTS_DIR / name
    assert os.access(path, os.X_OK), f"{name} is not executable"
    first = path.read_text().splitlines()[0]
    assert first == ("#!/bin/sh" if name in SH_SCRIPTS else "#!/usr/bin/env bash"), first


@pytest.mark.parametrize("name", SH_SCRIPTS + BASH_SCRIPTS)
def test_shellcheck_clean(name):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed ('./dev.sh setup' installs it)")
    dialect = "sh" if name in SH_SCRIPTS else "bash"
    proc = subprocess.run([shellcheck, "-s", dialect, str(SCRIPTS_DIR / name)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


HELP_OPTIONS = {
    "compatfs-boot": ("--root", "--config", "--stage", "--run-dir", "--timeout", "--supervise",
                      "--condition", "--dry-run", "--help", "COMPATFS", "exit status"),
    "compatfs-stop": ("--root", "--config", "--run-dir", "--timeout", "--dry-run", "--help",
                      "COMPATFS", "exit status"),
    "compatfs-debug-mount": ("--root", "--config", "--run-dir", "--timeout", "--foreground",
                             "--unmount", "--dry-run", "--help", "MOUNTPOINT", "COMPATFS",
                             "exit status"),
    "compatfs-ci-container": ("--engine", "--image", "--privileged", "--rebuild", "--build-only",
                              "--quirks", "--suite", "--mirror", "--ca-file", "--network",
                              "--engine-opts",
                              "--run-opts", "--no-install", "--dry-run", "--help", "podman",
                              "docker", "mmdebstrap", "COMPATFS_CI_ENGINE", "./dev.sh test",
                              "exit status"),
}


@pytest.mark.parametrize("name", sorted(HELP_OPTIONS))
def test_help_exits_0_and_names_every_option(name):
    proc = run(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {name}"), proc.stdout
    for option in HELP_OPTIONS[name]:
        assert option in proc.stdout, option


@pytest.mark.parametrize("name", sorted(HELP_OPTIONS))
def test_an_unknown_option_is_a_one_line_error_with_status_2(name):
    proc = run(name, "--no-such-option")
    assert proc.returncode == 2
    assert "--no-such-option" in one_line_error(proc, name)


def other_shells() -> list[tuple[str, ...]]:
    """POSIX shells besides /bin/sh to run the sh scripts with: busybox's ash is
    what EVE has (Debian's busybox package; skipped without it)."""
    shells = []
    if shutil.which("dash"):
        shells.append(("dash",))
    if shutil.which("busybox"):
        shells.append(("busybox", "sh"))
    return shells


@pytest.mark.parametrize("shell", other_shells() or [pytest.param((), marks=pytest.mark.skip(
    reason="neither dash nor busybox is installed"))], ids=lambda s: " ".join(s) or "none")
def test_sh_scripts_run_under_dash_and_busybox(shell, tmp_path):
    for name in SH_SCRIPTS:
        proc = run(name, "--help", shell=shell)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr)
    config = tmp_path / "c.yaml"
    config.write_text("stage: 'redirect'   # comment\n")
    proc = run("compatfs-boot", "--dry-run", "--root", str(tmp_path), "--config", str(config),
               shell=shell)
    assert proc.returncode == 0, proc.stderr
    assert " mount --root " in proc.stdout and "(stage redirect)" in proc.stdout


# -- compatfs-ci-container ---------------------------------------------------------
# Without running a container: dry runs, and a fake engine that records its calls.
# tests/test_ci_container.py runs the script for real.

CI = "compatfs-ci-container"


def ci_env(**extra: str) -> dict[str, str]:
    """script_env without the script's own settings (inside its container, for one,
    COMPATFS_CI_PRIVILEGED is set)."""
    env = {k: v for k, v in script_env().items()
           if not k.startswith("COMPATFS_CI_") and k != "CONTAINERS_CONF"}
    env.update(extra)
    return env


def dry_run(*args: str, env: dict[str, str] | None = None) -> list[str]:
    proc = run(CI, "--dry-run", *args, env=env or ci_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_ci_container_dry_run_prints_the_build_and_the_run():
    lines = dry_run("--engine", "docker")
    packages = subprocess.run([str(REPO / "dev.sh"), "packages"], capture_output=True,
                              text=True, check=True).stdout.split()
    assert "mount" in packages and "fuse3" in packages
    mmdebstrap = next(line for line in lines if line.startswith("mmdebstrap "))
    assert "--variant=apt" in mmdebstrap and " bookworm " in mmdebstrap
    assert mmdebstrap.split()[2].replace("\\,", ",") == "--include=" + ",".join(packages)
    base = re.search(r"^docker import \S+/rootfs\.tar (compatfs-ci-base:[0-9a-f]{16})$",
                     "\n".join(lines), re.M)
    assert base, lines
    setup = next(line for line in lines if line.startswith("docker run --name compatfs-ci-build-"))
    assert base.group(1) in setup and "./dev.sh setup" in setup
    ci = re.search(r"^docker commit \S+ (compatfs-ci:[0-9a-f]{16})$", "\n".join(lines), re.M)
    assert ci, lines
    cmd = lines[-1]
    assert cmd.startswith("docker run --rm ")
    for part in ("--device /dev/fuse", "--cap-add SYS_ADMIN", "--security-opt apparmor=unconfined",
                 "exec ./dev.sh test", f"{REPO}:/src:ro", ci.group(1)):
        assert part in cmd, part
    assert "--privileged" not in cmd.split(" bash -c ")[0]

    # the tags are hashes of the inputs: the same again, another suite another tag
    def same(line: str) -> str:
        return re.sub(r"-(run|build)-\d+", "", line)

    assert same(dry_run("--engine", "docker")[-1]) == same(cmd)
    trixie = dry_run("--engine", "docker", "--suite", "trixie")
    assert base.group(1) not in "\n".join(trixie) and ci.group(1) not in "\n".join(trixie)

    lines = dry_run("--engine", "podman", "--image", "example.org/ci:1", "--privileged",
                    "--", "-k", "boot", "-x")
    assert not any(line.startswith("mmdebstrap") for line in lines)
    assert any("example.org/ci:1 bash -c" in line and "./dev.sh setup" in line for line in lines)
    assert lines[-1].startswith("podman run --rm ")
    assert " --privileged " in lines[-1].split(" bash -c ")[0]
    assert lines[-1].endswith("-k boot -x")


def test_ci_container_options_and_environment_reach_the_engine():
    env = ci_env(COMPATFS_CI_ENGINE="podman", COMPATFS_CI_ENGINE_OPTS="--storage-driver vfs",
                 COMPATFS_CI_RUN_OPTS="--pids-limit 4096", COMPATFS_CI_QUIRKS="runc,cgroupfs")
    cmd = dry_run(env=env)[-1]
    assert cmd.startswith("podman --storage-driver vfs --runtime runc "
                          "--cgroup-manager=cgroupfs run --rm "), cmd
    assert " --pids-limit 4096 " in cmd and "CONTAINERS_CONF" not in cmd
    cmd = dry_run("--quirks", "no-ulimits", "--network", "none", env=env)[-1]
    assert re.match(r"CONTAINERS_CONF=\S+/containers\.conf podman --storage-driver vfs run ", cmd)
    assert " --network none " in cmd
    # pip in the build trusts the CA file the host's pip does (a proxy that re-signs TLS)
    ca = REPO / "pyproject.toml"   # any file: only mounted
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "COMPATFS_CI_CA_FILE"):
        env.pop(name, None)
    setup = [line for line in dry_run(env=env) if " run --name compatfs-ci-build-" in line]
    assert len(setup) == 1 and "PIP_CERT" not in setup[0] and "/run/compatfs-ci/" not in setup[0]
    lines = dry_run(env=dict(env, REQUESTS_CA_BUNDLE=str(ca)))
    setup = [line for line in lines if " run --name compatfs-ci-build-" in line]
    assert f" -v {ca}:/run/compatfs-ci/ca.crt:ro -e PIP_CERT=/run/compatfs-ci/ca.crt " in setup[0]
    assert "/run/compatfs-ci/" not in lines[-1]   # the test run needs no network
    proc = run(CI, "--dry-run", "--ca-file", str(REPO / "no-such.crt"), env=env)
    assert proc.returncode == 2 and "no-such.crt" in one_line_error(proc, CI)
    for bad, word in ((("--quirks", "fast"), "'fast'"), (("--engine", "lxc"), "'lxc'"),
                      (("--engine", "docker", "--quirks", "runc"), "podman's")):
        proc = run(CI, "--dry-run", *bad, env=ci_env())
        assert proc.returncode == 2 and word in one_line_error(proc, CI), proc.stderr


def path_without_engines(tmp_path: Path, fake: str | None = None) -> str:
    """A PATH with every command of ours except podman and docker (and, with *fake*,
    the fake engine of :data:`FAKE_ENGINE` under that name)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            if entry.name in ("podman", "docker") or (shim / entry.name).exists():
                continue
            (shim / entry.name).symlink_to(entry.path)
    if fake:
        (shim / fake).write_text(FAKE_ENGINE.replace("STATE", str(tmp_path)))
        (shim / fake).chmod(0o755)
    return str(shim)


#: An engine that records each call (CONTAINERS_CONF and its arguments) in STATE/calls,
#: knows the images pulled or committed, and runs no container: a probe ('true') is
#: refused unless $FAKE_QUIRKS is unset or every podman work-around is given; the test
#: run prints $FAKE_OUTPUT and exits $FAKE_STATUS.
FAKE_ENGINE = r"""#!/bin/sh
state=STATE
printf 'CONTAINERS_CONF=%s podman %s\n' "${CONTAINERS_CONF:-}" "$(printf %s "$*" | tr '\n' ' ')" \
    >> "$state/calls"
for last; do :; done
for sub; do case $sub in info|image|pull|commit|rm|run) break ;; esac; done
case $sub in
    info) exit 0 ;;
    image) grep -qxF "$last" "$state/images" 2>/dev/null || exit 1
           echo "sha256:$(printf %s "$last" | cksum | cut -d' ' -f1)"; exit 0 ;;
    pull|commit) echo "$last" >> "$state/images"; exit 0 ;;
    rm) exit 0 ;;
    run)
        if [ "$last" = true ]; then
            [ -z "${FAKE_QUIRKS:-}" ] && exit 0
            case " $* " in *" --runtime runc --cgroup-manager=cgroupfs "*)
                grep -q "default_ulimits = \[\]" "${CONTAINERS_CONF:-/nonexistent}" && exit 0 ;;
            esac
            echo "Error: crun: setrlimit RLIMIT_NOFILE: Operation not permitted" >&2; exit 126
        fi
        case " $* " in *" --rm "*) printf '%b\n' "$FAKE_OUTPUT"; exit "$FAKE_STATUS" ;; esac
        exit 0 ;;
esac
echo "fake engine: unexpected call: $*" >&2
exit 99
"""


def fake_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return ci_env(PATH=path_without_engines(tmp_path, fake="podman"), **extra)


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_ci_container_without_an_engine_exits_69(tmp_path):
    env = fake_env(tmp_path)
    (Path(env["PATH"]) / "podman").unlink()   # no engine at all
    proc = run(CI, "--no-install", env=env)
    assert proc.returncode == 69
    line = one_line_error(proc, CI)
    assert "podman" in line and "docker" in line and "--dry-run" in line
    # --dry-run still prints the commands
    proc = run(CI, "--dry-run", env=env)
    assert proc.returncode == 0 and "--device /dev/fuse" in proc.stdout


def test_ci_container_builds_once_runs_the_suite_and_passes_its_status_on(tmp_path):
    summary = "3 passed, 1 skipped in 1.50s"
    env = fake_env(tmp_path, FAKE_OUTPUT=f"collected 4 items\\n===== {summary} =====",
                   FAKE_STATUS="0")
    proc = run(CI, "--image", "example.org/ci:1", "--", "-q", "tests/test_mount.py", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"{CI}: {summary} (exit status 0)"
    first = calls(tmp_path)
    assert any(" pull example.org/ci:1" in c for c in first)
    commit = [c for c in first if " commit " in c]
    assert len(commit) == 1 and re.search(r"commit compatfs-ci-build-\d+ compatfs-ci:[0-9a-f]{16}$",
                                          commit[0])
    tag = commit[0].split()[-1]
    test_run = [c for c in first if " run --rm --name compatfs-ci-run-" in c]
    assert len(test_run) == 1 and tag in test_run[0]
    assert test_run[0].endswith("compatfs-ci -q tests/test_mount.py")

    # cached: no second build; a failing suite's status and summary come out
    (tmp_path / "calls").unlink()
    env.update(FAKE_OUTPUT="1 failed, 2 passed in 0.90s", FAKE_STATUS="1")
    proc = run(CI, "--image", "example.org/ci:1", env=env)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == f"{CI}: 1 failed, 2 passed in 0.90s (exit status 1)"
    assert not any(" commit " in c or " pull " in c for c in calls(tmp_path))
    # --rebuild builds again; no summary at all is an error with the engine's status
    env.update(FAKE_OUTPUT="Error: no such device", FAKE_STATUS="125")
    proc = run(CI, "--image", "example.org/ci:1", "--rebuild", env=env)
    assert proc.returncode == 125
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{CI}: error: the container exited with status 125 before pytest "
                           "printed its summary"), proc.stderr
    assert sum(" commit " in c for c in calls(tmp_path)) == 1


def test_ci_container_finds_the_podman_quirks_this_host_needs(tmp_path):
    env = fake_env(tmp_path, FAKE_OUTPUT="1 passed in 0.10s", FAKE_STATUS="0", FAKE_QUIRKS="1")
    proc = run(CI, "--image", "example.org/ci:1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--quirks runc,cgroupfs,no-ulimits" in proc.stderr and "RLIMIT_NOFILE" in proc.stderr
    after_probe = [c for c in calls(tmp_path)
                   if " commit " in c or " run --rm --name compatfs-ci-run-" in c]
    assert len(after_probe) == 2
    for call in after_probe:
        assert re.match(r"CONTAINERS_CONF=\S+ podman --runtime runc --cgroup-manager=cgroupfs ",
                        call), call
    # told the quirks, it does not probe; told none, podman's refusal is the error (69)
    (tmp_path / "calls").unlink()
    proc = run(CI, "--image", "example.org/ci:1", "--quirks", "runc,cgroupfs,no-ulimits", env=env)
    assert proc.returncode == 0, proc.stderr
    assert not any(c.endswith(" true") for c in calls(tmp_path))
    proc = run(CI, "--image", "example.org/ci:2", "--quirks", "none", "--build-only", env=env)
    assert proc.returncode == 0, proc.stderr  # --quirks none: no probe, the fake builds anyway
    assert not any(c.endswith(" true") for c in calls(tmp_path))
    env2 = dict(env, CONTAINERS_CONF=str(tmp_path / "mine.conf"))
    proc = run(CI, "--image", "example.org/ci:1", env=env2)
    assert proc.returncode == 69 and "RLIMIT_NOFILE" in one_line_error(proc, CI)


# -- dry runs -------------------------------------------------------------------------

def test_boot_dry_run_follows_the_stage(tmp_path):
    root, run_dir, config = tmp_path / "persist", tmp_path / "run", tmp_path / "c.yaml"
    root.mkdir()
    cf = compatfs_command()
    common = ("--root", str(root), "--config", str(config), "--run-dir", str(run_dir))

    config.write_text("require_encrypted_vault: true\nstage: redirect\n")
    proc = run("compatfs-boot", "--dry-run", *common)
    assert proc.returncode == 0, proc.stderr
    assert (f"would run: {cf} mount --root {root} --timeout 30 --config {config} "
            f"--run-dir {run_dir}\n") in proc.stdout
    assert "compatfs: ready (stage redirect)" in proc.stdout

    proc = run("compatfs-boot", "--dry-run", "--supervise", *common)
    assert proc.returncode == 0, proc.stderr
    assert f"{cf} mount --root {root} --foreground --config {config}" in proc.stdout

    config.write_text('stage: "off"  # not yet\n')
    proc = run("compatfs-boot", "--dry-run", *common)
    assert proc.returncode == 0 and "would run nothing" in proc.stdout

    config.write_text("stage: rollback\n")
    proc = run("compatfs-boot", "--dry-run", *common)
    assert proc.returncode == 0
    assert f"would run: {cf} rollback --root {root} --config {config}" in proc.stdout

    config.write_text("migration:\n  verify: true\n")  # no stage: compatfs's default
    proc = run("compatfs-boot", "--dry-run", *common, "--stage", "migrate")
    assert proc.returncode == 0 and "--stage migrate" in proc.stdout
    proc = run("compatfs-boot", "--dry-run", *common)
    assert proc.returncode == 0 and "(stage observe)" in proc.stdout
    assert "--stage" not in proc.stdout  # compatfs reads the config itself

    assert not any(mounts.is_compatfs(str(root / v)) for v in VIEWS)
    assert not run_dir.exists()


def test_boot_usage_errors(tmp_path):
    proc = run("compatfs-boot", "--stage", "fast", "--root", str(tmp_path))
    assert proc.returncode == 2 and "'fast'" in one_line_error(proc, "compatfs-boot")
    proc = run("compatfs-boot", "--config", str(tmp_path / "missing.yaml"), "--root", str(tmp_path))
    assert proc.returncode == 2 and "no such file" in one_line_error(proc, "compatfs-boot")
    proc = run("compatfs-boot", "--root", str(tmp_path / "nowhere"), "--stage", "observe")
    assert proc.returncode == 2 and "not a directory" in one_line_error(proc, "compatfs-boot")
    proc = run("compatfs-boot", "--root", str(tmp_path), "--stage", "observe",
               env=script_env(COMPATFS=str(tmp_path / "no-compatfs")))
    assert proc.returncode == 127 and "COMPATFS" in one_line_error(proc, "compatfs-boot")


def test_boot_condition_for_systemd(tmp_path):
    """ExecCondition: 0 starts the unit, 1 skips it, 255 fails it."""
    proc = run("compatfs-boot", "--condition", "--root", str(tmp_path), "--stage", "observe")
    assert proc.returncode == 0, proc.stderr
    proc = run("compatfs-boot", "--condition", "--root", str(tmp_path), "--stage", "off")
    assert proc.returncode == 1 and "nothing mounted" in proc.stdout
    proc = run("compatfs-boot", "--condition", "--root", str(tmp_path), "--stage", "fast")
    assert proc.returncode == 255


def test_stop_and_debug_mount_dry_runs(tmp_path):
    cf = compatfs_command()
    proc = run("compatfs-stop", "--dry-run", "--root", str(tmp_path), "--run-dir", "/r")
    assert proc.returncode == 0
    assert proc.stdout == f"would run: {cf} umount --root {tmp_path} --timeout 30 --run-dir /r\n"
    look = tmp_path / "look here"
    proc = run("compatfs-debug-mount", "--dry-run", "--root", str(tmp_path), str(look))
    assert proc.returncode == 0
    assert proc.stdout == (f"would run: mkdir -p '{look}'\n"
                           f"would run: {cf} debug-mount --root {tmp_path} --timeout 30 '{look}'\n")
    proc = run("compatfs-debug-mount", "--dry-run", "--unmount", str(look))
    assert proc.stdout == f"would run: {cf} debug-mount --unmount '{look}'\n"
    assert not look.exists()
    proc = run("compatfs-debug-mount", "--root", str(tmp_path))
    assert proc.returncode == 2 and "MOUNTPOINT" in one_line_error(proc, "compatfs-debug-mount")


# -- systemd units ----------------------------------------------------------------------

def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}:{number}: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_compatfs_service_has_the_required_keys():
    unit = parse_unit(SYSTEMD_DIR / "compatfs.service")
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == ["compatfs mount --foreground --root /persist "
                                    "--config /persist/config/compatfs.yaml"]
    assert "compatfs umount --root /persist" in service["ExecStop"][0]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartSec"] == ["1s"]
    assert service["KillMode"] == ["mixed"]
    assert re.fullmatch(r"\d+s?", service["TimeoutStopSec"][0])
    assert service["ExecCondition"][0].startswith("compatfs-boot --condition --root /persist")
    after = " ".join(unit["Unit"]["After"]).split()
    assert "local-fs.target" in after and "vaultmgr.service" in after
    assert "/persist" in unit["Unit"]["RequiresMountsFor"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("result,runs", [("success", True), ("signal", False),
                                         ("exit-code", False), (None, True)])
def test_exec_stop_unmounts_on_a_stop_but_not_after_a_crash(tmp_path, result, runs):
    """ExecStop runs after a crash too; the dead views must then stay (fail closed)
    for the restarted daemon to replace. Run the line as systemd would: $$ is $."""
    import shlex

    line = parse_unit(SYSTEMD_DIR / "compatfs.service")["Service"]["ExecStop"][0]
    argv = shlex.split(line.replace("$$", "$"))
    assert argv[:2] == ["/bin/sh", "-c"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "called"
    fake = bin_dir / "compatfs"
    fake.write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    if result is not None:
        env["SERVICE_RESULT"] = result
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert record.exists() == runs
    if runs:
        assert record.read_text().startswith("umount --root /persist")


def test_debug_template_has_the_required_keys():
    unit = parse_unit(SYSTEMD_DIR / "compatfs-debug@.service")
    service = unit["Service"]
    start = service["ExecStart"][0]
    assert start.startswith("compatfs debug-mount --foreground --root /persist ")
    assert start.endswith(" %I")
    assert service["ExecStopPost"] == ["-compatfs debug-mount --unmount %I"]
    assert "%I" in unit["Unit"]["Description"][0]


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit files are still checked "
                     "by test_*_has_the_required_keys)")
    # Exec lines name compatfs and compatfs-boot as installed on a device (found on
    # systemd's search path); here they are this checkout's.
    tools = {"compatfs": compatfs_command(), "compatfs-boot": str(SCRIPTS_DIR / "compatfs-boot")}
    for unit in SYSTEMD_DIR.glob("*.service"):
        text = re.sub(r"^(Exec\w+=-?)(compatfs(?:-boot)?) ",
                      lambda m: f"{m.group(1)}{tools[m.group(2)]} ",
                      unit.read_text(), flags=re.M)
        (tmp_path / unit.name).write_text(text)
    # a template is verified through an instance
    shutil.copy(tmp_path / "compatfs-debug@.service", tmp_path / "compatfs-debug@mnt-look.service")
    units = [tmp_path / "compatfs.service", tmp_path / "compatfs-debug@mnt-look.service"]
    proc = subprocess.run([analyze, "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # unknown keys and bad values are only warnings: none may name our units
    assert not [line for line in output.splitlines() if str(tmp_path) in line], output


# -- real runs on a device-like root ----------------------------------------------------

#: the tools the sh scripts call; under "busybox" they are busybox applets, as on EVE
BUSYBOX_APPLETS = ("sed", "awk", "stat", "ls", "date", "sleep", "mkdir", "cut")


def shell_for(kind: str, tmp_path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """(interpreter prefix, environment) to run the sh scripts with: the system's
    /bin/sh with its tools, or busybox ash with busybox's applets first on PATH."""
    if kind == "sh":
        return (), script_env()
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (apt-get install busybox): EVE's shell is "
                    "busybox ash; the scripts ran under /bin/sh only")
    applets = tmp_path / "busybox-bin"
    applets.mkdir()
    for name in BUSYBOX_APPLETS:
        (applets / name).symlink_to(busybox)
    return (busybox, "sh"), script_env(PATH=f"{applets}{os.pathsep}{os.environ['PATH']}")


def compatfs_mounts(root: Path, run_dir: Path) -> list[str]:
    return [e.mount_point for e in mounts.mount_table()
            if e.fstype == mounts.FSTYPE and (e.mount_point.startswith(str(run_dir) + "/")
                                               or e.mount_point in {str(root / v) for v in VIEWS})]


def clean_up(root: Path, run_dir: Path, config: Path) -> None:
    subprocess.run([compatfs_command(), "umount", "--root", str(root), "--run-dir", str(run_dir),
                    "--config", str(config)], capture_output=True, timeout=60,
                   env=script_env())
    teardown(root, run_dir, VIEWS)


@pytest.fixture
def device(tmp_path):
    """(root, run dir, config file) of a demo device on a loop-mounted ext4 with an
    encrypted vault; whatever the test leaves mounted is removed."""
    (tmp_path / "dev").mkdir()
    run_dir, config = tmp_path / "run", tmp_path / "compatfs.yaml"
    with device_root(tmp_path / "dev", size_mb=128) as root:
        devicegen.make_demo(str(root))
        try:
            yield root, run_dir, config
        finally:
            clean_up(root, run_dir, config)


def args(root: Path, run_dir: Path, config: Path) -> tuple[str, ...]:
    return ("--root", str(root), "--run-dir", str(run_dir), "--config", str(config),
            "--timeout", "20")


@pytest.mark.root
def test_boot_observe_and_redirect_then_stop(device):
    root, run_dir, config = device
    legacy = set(os.listdir(root / "img"))
    for stage in ("observe", "redirect"):
        config.write_text(f"stage: {stage}\n")
        proc = run("compatfs-boot", *args(root, run_dir, config))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == f"compatfs: ready (stage {stage})"
        assert all(mounts.is_compatfs(str(root / v)) for v in VIEWS)
        assert set(os.listdir(root / "img")) == legacy
        ctl = subprocess.run([compatfs_command(), "ctl", "--root", str(root), "--config",
                              str(config), "get", "stage"], capture_output=True, text=True,
                             timeout=30)
        assert ctl.stdout.strip() == stage, ctl.stderr
        again = run("compatfs-boot", *args(root, run_dir, config))  # idempotent
        assert again.returncode == 0 and "already mounted" in again.stderr
        proc = run("compatfs-stop", *args(root, run_dir, config))
        assert proc.returncode == 0, proc.stderr
        assert compatfs_mounts(root, run_dir) == []
        assert RunDir(str(run_dir), str(root)).live_pid() is None
        assert set(os.listdir(root / "img")) == legacy
    proc = run("compatfs-stop", *args(root, run_dir, config))  # nothing mounted: still 0
    assert proc.returncode == 0, proc.stderr
    assert "was not mounted" in proc.stderr


@pytest.mark.root
def test_boot_and_stop_under_busybox(device, tmp_path):
    root, run_dir, config = device
    shell, env = shell_for("busybox", tmp_path)
    config.write_text("stage: redirect\n")
    proc = run("compatfs-boot", *args(root, run_dir, config), shell=shell, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "compatfs: ready (stage redirect)"
    assert all(mounts.is_compatfs(str(root / v)) for v in VIEWS)
    proc = run("compatfs-stop", *args(root, run_dir, config), shell=shell, env=env)
    assert proc.returncode == 0, proc.stderr
    assert compatfs_mounts(root, run_dir) == []


@pytest.mark.root
def test_boot_stage_off_and_rollback_mount_nothing(device):
    root, run_dir, config = device
    config.write_text("stage: off\n")
    proc = run("compatfs-boot", *args(root, run_dir, config))
    assert proc.returncode == 0, proc.stderr
    assert "nothing mounted" in proc.stdout
    assert compatfs_mounts(root, run_dir) == []
    config.write_text("stage: rollback\n")
    proc = run("compatfs-boot", *args(root, run_dir, config))
    assert proc.returncode == 0, proc.stderr
    assert "moved 0 objects back" in proc.stderr and "rolled back" in proc.stdout
    assert compatfs_mounts(root, run_dir) == []


@pytest.mark.root
def test_boot_that_cannot_mount_fails_and_leaves_nothing_mounted(tmp_path):
    (tmp_path / "dev").mkdir()
    run_dir, config = tmp_path / "run", tmp_path / "compatfs.yaml"
    config.write_text("stage: redirect\nrequire_encrypted_vault: true\n")
    with device_root(tmp_path / "dev", size_mb=128, encrypted_vault=False) as root:
        devicegen.make_demo(str(root))
        try:
            proc = run("compatfs-boot", *args(root, run_dir, config))
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert "not encrypted" in proc.stderr
            assert proc.stderr.strip().splitlines()[-1].startswith(
                "compatfs-boot: error: compatfs mount failed (exit 1); nothing is mounted")
            assert "ready" not in proc.stdout
            assert compatfs_mounts(root, run_dir) == []
            assert RunDir(str(run_dir), str(root)).live_pid() is None
        finally:
            clean_up(root, run_dir, config)


@pytest.mark.root
def test_debug_mount_wrapper_mounts_an_inspection_view_and_unmounts_it(device, tmp_path):
    root, run_dir, config = device
    config.write_text("stage: observe\n")
    look = tmp_path / "look" / "here"  # created by the script
    try:
        proc = run("compatfs-debug-mount", *args(root, run_dir, config), str(look))
        assert proc.returncode == 0, proc.stderr
        assert mounts.mounted_at(str(look)) is not None
        names = os.listdir(look / "img")
        assert set(names) == set(os.listdir(root / "img"))
        assert os.getxattr(look / "img" / names[0], "user.compatfs.state") in (
            b"legacy", b"unresolved")
        proc = run("compatfs-debug-mount", "--unmount", str(look))
        assert proc.returncode == 0, proc.stderr
        assert mounts.mounted_at(str(look)) is None
        proc = run("compatfs-debug-mount", "--unmount", str(look))  # nothing there: an error
        assert proc.returncode == 1 and "is not mounted" in proc.stderr
    finally:
        if mounts.mounted_at(str(look)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(look)], capture_output=True)


def wait_for(predicate, deadline_s: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"supervisor exited with {proc.returncode} before {what}:\n"
                                 f"{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {deadline_s} s:\n"
                                 f"{log.read_text(errors='replace')}")
        time.sleep(0.01)


def views_answer(root: Path) -> bool:
    try:
        return all(mounts.is_compatfs(str(root / v)) and os.listdir(root / v) is not None
                   for v in VIEWS)
    except OSError:
        return False


@pytest.mark.root
def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _where_stuck(*pids: int | None) -> str:
    """Each process's state and the kernel function it sleeps in, for a failure report."""
    lines = []
    for pid in pids:
        if pid is None:
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError as exc:
            lines.append(f"pid {pid}: {exc.strerror}")
            continue
        lines.append(f"pid {pid}: state {state}, sleeping in {wchan or '-'}")
    return "\n".join(lines)


@pytest.mark.parametrize("kind", ["sh", "busybox"])
def test_supervised_daemon_comes_back_after_sigkill_and_a_signal_stops_it(device, tmp_path,
                                                                         capsys, kind):
    root, run_dir, config = device
    shell, env = shell_for(kind, tmp_path)
    config.write_text("stage: observe\n")
    log = run_dir.parent / "supervisor.log"
    rundir = RunDir(str(run_dir), str(root))
    with open(log, "wb") as out:
        # SIGINT at its default, as a terminal or an init system starts it: a test
        # run started with & ignores SIGINT, the supervisor would inherit that,
        # and a shell cannot trap a signal ignored on entry (docs/operations.md)
        sup = subprocess.Popen([*shell, str(SCRIPTS_DIR / "compatfs-boot"), "--supervise",
                                *args(root, run_dir, config)], stdin=subprocess.DEVNULL,
                               stdout=out, stderr=out, env=env, start_new_session=True,
                               preexec_fn=_default_sigint)
    try:
        wait_for(lambda: "compatfs: ready (stage observe)" in log.read_text()
                 and rundir.live_pid() is not None, 20, "first readiness", sup, log)
        first = rundir.live_pid()
        assert first is not None and views_answer(root)

        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()

        def back() -> bool:
            pid = rundir.live_pid()
            return pid is not None and pid != first and views_answer(root)

        wait_for(back, 20, "restarted views", sup, log)
        recovery = time.monotonic() - killed
        with capsys.disabled():
            print(f"\ncompatfs-boot --supervise ({kind}): views answered again "
                  f"{recovery:.2f} s after the daemon was SIGKILLed")
        assert recovery < RECOVERY_LIMIT_S, log.read_text()
        second = rundir.live_pid()
        text = log.read_text()
        assert "killed by SIGKILL" in text and "restarting it now" in text, text

        stop = signal.SIGINT if kind == "busybox" else signal.SIGTERM  # both stop it
        sup.send_signal(stop)
        try:
            rc = sup.wait(timeout=40)
        except subprocess.TimeoutExpired:   # say where each process is stuck
            pytest.fail(f"the supervisor did not stop within 40 s of {stop.name}\n"
                        f"{log.read_text()}\n{_where_stuck(sup.pid, second)}", pytrace=False)
        assert rc == 0, log.read_text()
        assert f"{stop.name}: stopping the daemon" in log.read_text()
        assert "stopped (the daemon exited with status 0)" in log.read_text()
        assert compatfs_mounts(root, run_dir) == []
        assert rundir.live_pid() is None
        assert second is not None and not os.path.exists(f"/proc/{second}")
    finally:
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(timeout=40)
            except subprocess.TimeoutExpired:
                sup.kill()
                sup.wait(timeout=10)
