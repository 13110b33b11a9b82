"""The preserved-fd registry on real memfds: validation, dependency order, cycles, limits,
ownership of the fds."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luo_agent.errors import AlreadyExists, InvalidArgument
from luo_agent.fdkind import check_preservable
from luo_agent.registry import (
    AGENT_SESSION_NAME,
    RESERVED_SESSION_NAMES,
    SESSION_NAME_MAX_BYTES,
    TOKEN_MAX,
    Entry,
    FdRegistry,
    Key,
)

MEMFD_NAME = "luo-registry-test"
MakeFd = Callable[[], int]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        return False
    return True


def is_our_memfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{MEMFD_NAME}")
    except OSError:
        return False


@pytest.fixture
def registry() -> Iterator[FdRegistry]:
    reg = FdRegistry(check_fd=check_preservable)
    yield reg
    reg.close_all()


@pytest.fixture
def make_fd(registry: FdRegistry) -> Iterator[MakeFd]:
    """Real memfds; those a test did not hand to the registry are closed afterwards."""
    created: set[int] = set()

    def make() -> int:
        fd = os.memfd_create(MEMFD_NAME)
        created.add(fd)
        return fd

    yield make
    registry.close_all()  # first, so every fd still open below was never handed over
    for fd in created:
        if is_our_memfd(fd):
            os.close(fd)


def add(
    reg: FdRegistry, make_fd: MakeFd, session: str, token: int, *deps: tuple[str, int]
) -> Entry:
    return reg.add(session, token, make_fd(), owner=":1.42", depends_on=deps)


def keys(entries: list[Entry]) -> list[tuple[str, int]]:
    return [(e.session, e.token) for e in entries]


# ------------------------------------------------------------------------------ registration


def test_add_and_query(registry: FdRegistry, make_fd: MakeFd) -> None:
    fd = make_fd()
    entry = registry.add("vm1", 7, fd, owner=":1.42")
    assert entry == Entry("vm1", 7, fd, ":1.42", ())
    assert entry.key == Key("vm1", 7)
    add(registry, make_fd, "db", 0)
    add(registry, make_fd, "vm1", 8, ("vm1", 7))
    assert registry.get("vm1", 7) == entry
    assert ("vm1", 8) in registry
    assert len(registry) == 3
    assert registry.sessions() == ["vm1", "db"]
    assert keys(registry.dependents("vm1", 7)) == [("vm1", 8)]
    with pytest.raises(InvalidArgument, match="no fd registered as 'vm1'/9"):
        registry.get("vm1", 9)


def test_duplicate_key_is_already_exists_and_changes_nothing(
    registry: FdRegistry, make_fd: MakeFd
) -> None:
    first = add(registry, make_fd, "vm1", 1)
    second_fd = make_fd()
    with pytest.raises(AlreadyExists) as info:
        registry.add("vm1", 1, second_fd, owner=":1.43")
    assert info.value.errno == errno.EEXIST
    assert "'vm1'/1 is already registered" in str(info.value)
    assert registry.get("vm1", 1) == first
    assert len(registry) == 1
    registry.add("vm2", 1, second_fd, owner=":1.43")  # the same token in another session is fine


@pytest.mark.parametrize("name", sorted(RESERVED_SESSION_NAMES))
def test_reserved_session_names(registry: FdRegistry, make_fd: MakeFd, name: str) -> None:
    with pytest.raises(InvalidArgument, match="reserved"):
        add(registry, make_fd, name, 1)
    assert len(registry) == 0


def test_reserved_names_are_the_two_constants() -> None:
    assert {"systemd", AGENT_SESSION_NAME} == RESERVED_SESSION_NAMES
    assert AGENT_SESSION_NAME == "luo-agent"


@pytest.mark.parametrize(
    "name",
    [
        "a" * SESSION_NAME_MAX_BYTES,  # 63 bytes
        "é" * 31 + "a",  # 63 bytes in 32 characters
        "x",
        "systemd2",
        "Systemd",  # the kernel compares bytes; only the exact name is PID 1's
        "vm:1/ä",
    ],
)
def test_session_names_accepted(registry: FdRegistry, make_fd: MakeFd, name: str) -> None:
    assert add(registry, make_fd, name, 1).session == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("a" * 64, "1..63 bytes"),
        ("é" * 32, "1..63 bytes"),  # 32 characters but 64 bytes
        ("", "1..63 bytes"),
        ("vm\0", "NUL"),
        ("bad\udc80", "UTF-8"),  # a lone surrogate cannot be encoded
    ],
)
def test_session_names_refused(registry: FdRegistry, make_fd: MakeFd, name: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        add(registry, make_fd, name, 1)


@pytest.mark.parametrize("token", [0, 1, TOKEN_MAX])
def test_tokens_accepted(registry: FdRegistry, make_fd: MakeFd, token: int) -> None:
    assert add(registry, make_fd, "vm", token).token == token


@pytest.mark.parametrize("token", [-1, TOKEN_MAX + 1, True, "1", 1.0])
def test_tokens_refused(registry: FdRegistry, make_fd: MakeFd, token: object) -> None:
    with pytest.raises(InvalidArgument, match="token"):
        add(registry, make_fd, "vm", token)  # type: ignore[arg-type]


def test_bad_fds_are_refused_and_stay_with_the_caller(
    registry: FdRegistry, make_fd: MakeFd
) -> None:
    with pytest.raises(InvalidArgument, match="not a file descriptor"):
        registry.add("vm", 1, -1, owner="x")
    fd = add(registry, make_fd, "vm", 1).fd
    with pytest.raises(InvalidArgument, match="already held"):
        registry.add("vm", 2, fd, owner="x")
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(InvalidArgument, match="character device"):
            registry.add("vm", 3, null, owner="x")
        assert ("vm", 3) not in registry
        assert is_open(null)  # a refused fd still belongs to the caller
    finally:
        os.close(null)


# ------------------------------------------------------------------------------- dependencies


def test_unknown_dependency(registry: FdRegistry, make_fd: MakeFd) -> None:
    with pytest.raises(InvalidArgument, match=r"'vm'/2 depends on 'vm'/1, which is not registered"):
        add(registry, make_fd, "vm", 2, ("vm", 1))
    with pytest.raises(InvalidArgument, match="must be"):
        registry.add("vm", 3, make_fd(), owner="x", depends_on=["vm"])  # type: ignore[list-item]
    assert len(registry) == 0


def test_self_dependency_is_a_cycle(registry: FdRegistry, make_fd: MakeFd) -> None:
    with pytest.raises(InvalidArgument, match=r"dependency cycle: 'vm'/1 -> 'vm'/1$"):
        add(registry, make_fd, "vm", 1, ("vm", 1))


def test_valid_registration_order_is_kept(registry: FdRegistry, make_fd: MakeFd) -> None:
    add(registry, make_fd, "b", 1)
    add(registry, make_fd, "a", 1)
    add(registry, make_fd, "c", 1, ("a", 1))
    add(registry, make_fd, "a", 0)
    assert keys(registry.preservation_order()) == [("b", 1), ("a", 1), ("c", 1), ("a", 0)]


def test_limits(make_fd: MakeFd) -> None:
    with FdRegistry(check_fd=check_preservable, max_per_session=2, max_total=3) as reg:
        add(reg, make_fd, "a", 1)
        add(reg, make_fd, "a", 2)
        with pytest.raises(InvalidArgument, match="session 'a' is full"):
            add(reg, make_fd, "a", 3)
        add(reg, make_fd, "b", 1)
        with pytest.raises(InvalidArgument, match="registry is full"):
            add(reg, make_fd, "c", 1)
        reg.remove("a", 1)
        add(reg, make_fd, "a", 3)
        assert len(reg) == 3
    assert len(reg) == 0
    with pytest.raises(InvalidArgument, match="at least 1"):
        FdRegistry(check_fd=check_preservable, max_per_session=0)


# --------------------------------------------------------------------------- state, ownership


def test_remove_closes_or_hands_over_the_fd(registry: FdRegistry, make_fd: MakeFd) -> None:
    closed = add(registry, make_fd, "vm", 1).fd
    kept = add(registry, make_fd, "vm", 2).fd
    assert registry.remove("vm", 1).fd == closed
    assert not is_open(closed)
    entry = registry.remove("vm", 2, close_fd=False)
    assert entry.fd == kept
    assert is_open(kept)
    os.close(kept)
    assert len(registry) == 0
    with pytest.raises(InvalidArgument, match="no fd registered"):
        registry.remove("vm", 1)


def test_close_all_closes_every_owned_fd(make_fd: MakeFd) -> None:
    reg = FdRegistry(check_fd=check_preservable)
    fds = [add(reg, make_fd, "vm", token).fd for token in range(5)]
    assert all(is_open(fd) for fd in fds)
    reg.close_all()
    assert [is_open(fd) for fd in fds] == [False] * 5
    assert len(reg) == 0
    assert reg.preservation_order() == []


def test_close_all_closes_the_rest_when_one_close_fails(make_fd: MakeFd) -> None:
    reg = FdRegistry(check_fd=check_preservable)
    first = add(reg, make_fd, "vm", 1).fd
    second = add(reg, make_fd, "vm", 2).fd
    os.close(first)  # a bug elsewhere closed an fd the registry owns
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        reg.close_all()
    assert info.value.errno == errno.EBADF
    assert not is_open(second)
    assert len(reg) == 0


# -------------------------------------------------------------------------- generated graphs


@settings(max_examples=150, deadline=None)
@given(
    wishes=st.lists(st.lists(st.integers(0, 11), max_size=4), min_size=1, max_size=12),
)
def test_generated_dependencies_keep_a_valid_order(wishes: list[list[int]]) -> None:
    """Node i asks for dependencies among 0..11: refused unless all are registered already."""
    base = os.memfd_create(MEMFD_NAME)
    reg = FdRegistry(check_fd=check_preservable)
    try:
        for node, deps in enumerate(wishes):
            wanted = [Key(f"s{d % 3}", d) for d in deps]
            fd = os.dup(base)
            if any(d >= node for d in deps):
                with pytest.raises(InvalidArgument):
                    reg.add(f"s{node % 3}", node, fd, owner="x", depends_on=wanted)
                wanted = []  # refused, the fd still the caller's: registered without them
            reg.add(f"s{node % 3}", node, fd, owner="x", depends_on=wanted)
        order = reg.preservation_order()
        position = {entry.key: i for i, entry in enumerate(order)}
        assert len(position) == len(wishes)  # every entry exactly once
        for entry in order:
            assert entry.depends_on == tuple(dict.fromkeys(entry.depends_on))
            for dep in entry.depends_on:
                assert position[dep] < position[entry.key]
        assert [e.token for e in order] == list(range(len(wishes)))
    finally:
        reg.close_all()
        os.close(base)
