"""POSIX ACL values: parsed and checked, remapped and sorted, narrowed."""

from __future__ import annotations

import pytest

from engine import acl

U = acl.UNDEFINED_ID
VALUE = acl.pack([(acl.USER_OBJ, 6, U), (acl.USER, 4, 1234), (acl.GROUP_OBJ, 4, U),
                  (acl.GROUP, 6, 5678), (acl.MASK, 6, U), (acl.OTHER, 0, U)])


def test_named_ids_and_remap_keep_the_kernels_order() -> None:
    assert acl.named_ids(VALUE) == ({1234}, {5678})
    mapped = acl.remap(VALUE, lambda u: {1234: 2000}.get(u, u), lambda g: 7)
    entries = acl.parse(mapped)
    assert (acl.USER, 4, 2000) in entries and (acl.GROUP, 6, 7) in entries
    assert [e[0] for e in entries] == sorted(e[0] for e in entries)


def test_narrow_gives_the_group_bits_of_the_owning_group_not_the_mask() -> None:
    assert acl.narrow(0o660, VALUE) == 0o640
    assert acl.narrow(0o4770, VALUE) == 0o4740


@pytest.mark.parametrize("value", [b"", b"\x02\x00\x00", b"\x01\x00\x00\x00",
                                   VALUE[:-1], VALUE[:4] + b"\x40\x00\x06\x00\xff\xff\xff\xff",
                                   VALUE[:4] + b"\x01\x00\x09\x00\xff\xff\xff\xff"])
def test_what_is_not_an_acl_is_refused(value: bytes) -> None:
    with pytest.raises(ValueError):
        acl.parse(value)
