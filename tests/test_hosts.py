"""The hosts file format (pure parsing; SSH itself is tested against real servers elsewhere)."""

from __future__ import annotations

import pytest

from distexec.launchers.hosts import (
    HostSpec,
    HostsFileError,
    parse_host,
    parse_hosts,
    read_hosts_file,
)

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("line, expected", [
    ("node1", HostSpec("node1")),
    ("alice@node1", HostSpec("node1", user="alice")),
    ("node1:2222", HostSpec("node1", port=2222)),
    ("alice@10.0.0.5:2222 slots=8", HostSpec("10.0.0.5", "alice", 2222, 8)),
    ("node2 slots=4 python=/opt/py/bin/python3", HostSpec("node2", slots=4,
                                                          python="/opt/py/bin/python3")),
    ("[2001:db8::1]:2200 slots=2", HostSpec("2001:db8::1", port=2200, slots=2)),
    ("bob@[::1]", HostSpec("::1", user="bob")),
    ("node3 slots=4 max_slots=8", HostSpec("node3", slots=4,  # an Open MPI hostfile line
                                           settings=(("max_slots", "8"),))),
    ("node5 gpus=2 zone=eu", HostSpec("node5", settings=(("gpus", "2"), ("zone", "eu")))),
    ("  node4\tslots=2   # the big one", HostSpec("node4", slots=2)),
])
def test_lines(line, expected):
    spec = parse_host(line, "f:1")
    assert spec == HostSpec(expected.host, expected.user, expected.port, expected.slots,
                            expected.python, "f:1", settings=expected.settings)


@pytest.mark.parametrize("line", ["", "   ", "# a comment", "  # indented comment"])
def test_blank_and_comment_lines(line):
    assert parse_host(line) is None


@pytest.mark.parametrize("line, why", [
    ("node1 slots=0", "slots must be a whole number >= 1"),
    ("node1 slots=four", "slots must be a whole number >= 1"),
    ("node1 slot=4", "unknown setting 'slot' (did you mean 'slots'?)"),
    ("node1 pyhton=/usr/bin/python3", "did you mean 'python'?"),
    ("node1 =3", "needs a key and a value"),
    ("node1 python=python3", "python must be an absolute path"),
    ("node1:99999", "port must be a number from 1 to 65535"),
    ("node1:", "port must be a number"),
    ("@node1", "empty user name"),
    ("2001:db8::1", "must be written in brackets"),
    ("[2001:db8::1", "unclosed '['"),
    ("node1 slots=2 slots=3", "slots given twice"),
    ("node1 fast", "'fast' is not key=value"),
])
def test_bad_lines_say_what_is_wrong(line, why):
    with pytest.raises(HostsFileError) as info:
        parse_host(line, "cluster.txt:7")
    message = str(info.value)
    assert message.startswith("cluster.txt:7: ")
    assert why in message
    assert repr(line.strip()) in message


def test_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "hosts.txt"
    path.write_text("# cluster\nnode1 slots=2\n\nnode2 slots=x\n")
    with pytest.raises(HostsFileError, match=r"hosts\.txt:4: slots must be"):
        read_hosts_file(path)


def test_file_round_trip(tmp_path):
    path = tmp_path / "hosts.txt"
    path.write_text("# cluster\nnode1 slots=2\n\nroot@node2:2222 python=/usr/bin/python3\n")
    specs = read_hosts_file(path)
    assert [s.label for s in specs] == ["node1", "root@node2:2222"]
    assert specs[0].origin == f"{path}:2" and specs[1].origin == f"{path}:4"


def test_empty_list_is_an_error():
    with pytest.raises(HostsFileError, match="no hosts"):
        parse_hosts(["# nothing", ""], "hosts.txt")


def test_labels():
    assert HostSpec("::1", "u", 22).label == "u@[::1]:22"
    assert HostSpec("node").label == "node"


def test_duplicate_lines_add_up_their_slots():
    from distexec.launchers.hosts import merge_duplicates

    specs = parse_hosts(["node1 slots=2", "node2", "node1 slots=3", "node2 slots=4",
                         "node3 python=/a/python", "node3 python=/b/python"], "f")
    merged = merge_duplicates(specs)
    assert [(s.label, s.slots) for s in merged] == [
        ("node1", 5), ("node2", None), ("node3", None), ("node3#2", None)]
