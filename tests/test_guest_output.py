"""Reading a guest script's result from what the guest's two serial ports carried."""

from __future__ import annotations

from outboard.testing.guest import BEGIN_MARKER, END_MARKER, parse_output

CONSOLE = ("[    1.0] virtio_blk virtio0: [vda] 8192 512-byte logical blocks\n"
           "outboard-init: script exited with status 3, powering off\n"
           "[    6.1] reboot: Power down\n")


def test_the_end_marker_gives_status_and_output() -> None:
    raw = f"noise\n{BEGIN_MARKER}\nline one\nline two\n\n{END_MARKER} status=0\n"
    assert parse_output(raw) == (0, "line one\nline two\n")


def test_an_unfinished_script_has_no_result() -> None:
    assert parse_output(f"{BEGIN_MARKER}\nline one\n") is None
    assert parse_output("line one\n", CONSOLE) is None  # it never began


def test_a_lost_end_marker_takes_the_status_from_the_console() -> None:
    """The script port's last bytes can be lost at power-off (seen after a
    pause and resume of the VM); the init's console line, written after it,
    carries the same status."""
    raw = f"{BEGIN_MARKER}\nline one\ndone: yes\n"
    assert parse_output(raw) is None
    assert parse_output(raw, CONSOLE) == (3, "line one\ndone: yes\n")
    assert parse_output(raw, "[    6.1] reboot: Power down\n") is None
