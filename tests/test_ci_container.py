"""The test suite in a real container: mountscripts/compatfs-ci-container builds its
image here from Debian packages (no registry), once, and runs a subset of the suite
in it, as a container with only /dev/fuse and CAP_SYS_ADMIN, then with --privileged
for the tests that need loop devices. Also the CI files, read as YAML.

Where no container engine can run containers, the script exits 69 and these tests
skip with its reason; on a Debian machine it installs podman (./dev.sh
container-setup) first. The image stays cached by the hash of its inputs; every
container is removed, also when a run fails or times out.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest
import yaml

from .conftest import REPO
from .devices import no_loop_devices

SCRIPT = REPO / "mountscripts" / "compatfs-ci-container"
PROG = SCRIPT.name
EX_NO_ENGINE = 69
#: the first build installs podman and mmdebstrap, builds the root file system and the
#: Python environment; later runs find the image
BUILD_TIMEOUT_S = 1500
RUN_TIMEOUT_S = 600
CACHED_BUILD_LIMIT_S = 60

#: Without loop devices: the views mounted and unmounted (test_mount), the debug mount
#: of a tree, and tests that need a device image, which must be skipped with the reason.
UNPRIVILEGED_SUBSET = (
    "tests/test_mount.py",
    "tests/test_debug_mount.py",
    "tests/test_workflows.py::test_volumemgr_creates_lists_resizes_and_deletes_volumes",
    "tests/test_control.py",
    "tests/test_names.py",
)
#: With --privileged: the agents' workflows and a debug mount of a live device, on
#: loop-mounted ext4 images with an fscrypt vault.
PRIVILEGED_SUBSET = (
    "tests/test_workflows.py",
    "tests/test_debug_mount.py::test_inspects_a_live_device_and_changes_nothing",
)


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str
    elapsed: float


def run_script(*args: str, timeout: float) -> Result:
    """Run the script in its own process group; on a timeout SIGTERM the group (the
    script's trap removes its containers), then SIGKILL it."""
    env = dict(os.environ)
    for name in ("COMPATFS_CI_IMAGE", "COMPATFS_CI_PRIVILEGED", "COMPATFS_DEBUG"):
        env.pop(name, None)
    start = time.monotonic()
    proc = subprocess.Popen([str(SCRIPT), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{PROG} {' '.join(args)} took over {timeout} s:\n{out[-4000:]}\n"
                    f"{err[-4000:]}", pytrace=False)
    return Result(proc.returncode, out, err, time.monotonic() - start)


def summary_of(result: Result) -> dict[str, int]:
    """The counts of the summary line the script prints last: 'PROG: 3 passed,
    1 skipped in 1.50s (exit status 0)' -> {'passed': 3, 'skipped': 1}."""
    lines = result.stdout.strip().splitlines()
    last = re.fullmatch(rf"{PROG}: (.*) in [0-9.]+s.* \(exit status (\d+)\)",
                        lines[-1] if lines else "")
    assert last, f"no summary line from {PROG}:\n{result.stdout[-4000:]}\n{result.stderr}"
    assert int(last.group(2)) == result.status
    counts = {}
    for number, word in re.findall(r"(\d+) ([a-z]+)", last.group(1)):
        counts[{"error": "errors", "warning": "warnings"}.get(word, word)] = int(number)
    return counts


def test_the_summary_is_read_from_the_last_line():
    ok = Result(0, f"...\n{PROG}: 12 passed, 3 skipped, 1 warning in 40.10s (exit status 0)\n",
                "", 0)
    assert summary_of(ok) == {"passed": 12, "skipped": 3, "warnings": 1}
    bad = Result(1, f"{PROG}: 1 failed, 2 passed, 1 error in 100.00s (0:01:40) (exit status 1)",
                 "", 0)
    assert summary_of(bad) == {"failed": 1, "passed": 2, "errors": 1}
    with pytest.raises(AssertionError, match="no summary line"):
        summary_of(Result(125, "Error: no such image\n", "", 0))
    with pytest.raises(AssertionError):   # the status printed is not the status
        summary_of(Result(0, f"{PROG}: 1 failed in 1.00s (exit status 1)", "", 0))


def test_no_loop_devices_names_the_reason(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the check answers only for root")
    why = no_loop_devices(str(tmp_path / "loop-control"))
    assert why is not None and "does not exist" in why and "device images" in why
    (tmp_path / "file").write_text("")
    why = no_loop_devices(str(tmp_path / "file"))      # opens: counts as there
    assert why is None


@dataclass
class Image:
    engine: str
    ref: str


def image_line(result: Result) -> Image:
    found = re.findall(rf"^{PROG}: (podman|docker), image (compatfs-ci:[0-9a-f]+)$",
                       result.stderr, re.M)
    assert found, result.stderr
    return Image(*found[-1])


@pytest.fixture(scope="module")
def image() -> Image:
    """The cached image (built now if it is not there yet), or a skip saying why no
    container can run here."""
    if os.environ.get("COMPATFS_CI_CONTAINER"):
        pytest.skip(f"already inside a {PROG} container: no container in the container")
    if os.environ.get("COMPATFS_CI_CONTAINER_TEST") == "skip":
        pytest.skip("COMPATFS_CI_CONTAINER_TEST=skip: the container route runs in its own "
                    "CI job")
    first = run_script("--build-only", timeout=BUILD_TIMEOUT_S)
    if first.status == EX_NO_ENGINE:
        pytest.skip(f"no container can run here: {first.stderr.strip().splitlines()[-1]}")
    assert first.status == 0, first.stdout[-4000:] + first.stderr[-8000:]
    built = image_line(first)
    # the second time nothing is built: the image is found by the hash of its inputs
    again = run_script("--build-only", timeout=BUILD_TIMEOUT_S)
    assert again.status == 0, again.stderr
    assert image_line(again) == built
    assert "building" not in again.stderr, again.stderr
    assert again.elapsed < CACHED_BUILD_LIMIT_S, again.elapsed
    return built


def containers_left(image: Image) -> list[str]:
    """The script's containers still there, in any state."""
    proc = subprocess.run([image.engine, "ps", "--all", "--format", "{{.Names}}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [n for n in proc.stdout.split() if re.fullmatch(r"compatfs-ci-(run|build|probe)-\d+", n)]


def run_subset(image: Image, *args: str) -> tuple[Result, dict[str, int]]:
    result = run_script(*args, timeout=RUN_TIMEOUT_S)
    assert image_line(result) == image, "the suite ran in another image than the cached one"
    assert containers_left(image) == [], "a container was left behind"
    return result, summary_of(result)


@pytest.mark.slow
@pytest.mark.root
def test_subset_passes_in_a_container_with_only_dev_fuse(image):
    result, counts = run_subset(image, "--", "-q", "-p", "no:cacheprovider",
                                *UNPRIVILEGED_SUBSET)
    output = result.stdout
    assert result.status == 0, output[-6000:]
    assert counts.get("failed", 0) == 0 and counts.get("errors", 0) == 0, counts
    assert counts.get("passed", 0) >= 15, counts
    # the device-image tests are skipped, each with the reason
    assert counts.get("skipped", 0) >= 2, counts
    skips = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("no loop devices here" in line for line in skips), skips
    assert "--privileged gives them" in skips[0]


@pytest.mark.slow
@pytest.mark.root
def test_workflows_pass_in_a_privileged_container(image):
    result, counts = run_subset(image, "--privileged", "--", "-q", "-p", "no:cacheprovider",
                                *PRIVILEGED_SUBSET)
    assert result.status == 0, result.stdout[-6000:]
    assert counts.get("skipped", 0) == 0 and counts.get("failed", 0) == 0, counts
    assert counts.get("passed", 0) >= 9, counts


@pytest.mark.slow
@pytest.mark.root
def test_the_suites_status_comes_out_of_the_container(image):
    """A run that selects nothing: pytest's status 5 is the script's."""
    result, counts = run_subset(image, "--", "-q", "-p", "no:cacheprovider", "tests/test_names.py",
                                "-k", "no_test_is_called_this")
    assert result.status == 5, result.stdout[-4000:]
    assert counts.get("deselected", 0) > 0 and "passed" not in counts, counts


# -- the CI files ---------------------------------------------------------------------

def ci_file(path: str) -> dict:
    with open(REPO / path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict), path
    return doc


def scripts_of(job: dict) -> str:
    steps = job.get("steps") or []
    lines = [s.get("run", "") for s in steps if isinstance(s, dict)]
    lines += [*job.get("before_script", []), *job.get("script", [])]
    return "\n".join(lines)


def test_github_workflow_runs_the_suite_and_the_container_route():
    doc = ci_file(".github/workflows/tests.yml")
    assert {"push", "pull_request"} <= set(doc[True] if True in doc else doc["on"])
    jobs = doc["jobs"]
    runs = {name: scripts_of(job) for name, job in jobs.items()}
    assert any("sudo ./dev.sh test" in text for text in runs.values()), runs
    assert any("mountscripts/compatfs-ci-container" in text for text in runs.values()), runs
    for name, job in jobs.items():
        assert job["runs-on"].startswith("ubuntu-"), name
        assert "timeout-minutes" in job, name


def test_gitlab_ci_runs_the_suite_and_the_container_route():
    doc = ci_file(".gitlab-ci.yml")
    jobs = {name: job for name, job in doc.items()
            if isinstance(job, dict) and "script" in job and not name.startswith(".")}
    runs = {name: scripts_of(job) for name, job in jobs.items()}
    assert any("./dev.sh test" in text for text in runs.values()), runs
    assert any("mountscripts/compatfs-ci-container" in text for text in runs.values()), runs
    for name, job in jobs.items():
        assert "timeout" in job, name
