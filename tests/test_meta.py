"""Owners and modes as a recipient may set them: by name, by number, and as a user
who is not root (a setuid/setgid bit never outlives the owner it belonged to)."""

from __future__ import annotations

import os
import stat

from engine.messages import Entry, Note
from recipient.meta import Notes, Owners


def _notes() -> tuple[Notes, list[Note]]:
    seen: list[Note] = []
    return Notes(seen.append), seen


def test_owners_map_by_name_then_by_number() -> None:
    owners = Owners(numeric_ids=False)
    owners.learn((("u", 4242, "root"), ("g", 4343, "no-such-group-here")))
    assert owners.uid(4242) == 0  # "root" here is 0, whatever the donor's number
    assert owners.gid(4343) == 4343  # an unknown name keeps its number
    numeric = Owners(numeric_ids=True)
    numeric.learn((("u", 4242, "root"),))
    assert numeric.uid(4242) == 4242


def test_a_user_who_is_not_root_drops_the_bits_it_cannot_keep() -> None:
    owners = Owners(numeric_ids=True)
    owners.root, owners.euid, owners.egid, owners.groups = False, 1000, 1000, {1000, 50}
    notes, seen = _notes()
    suid = Entry(1, "f", "bin/tool", 1, 0o4755 | stat.S_ISGID, 0, uid=0, gid=50)
    assert owners.decide(suid, notes) == (-1, 50, 0o2755)  # group 50 is ours: kept
    mine = Entry(2, "f", "bin/mine", 1, 0o4755, 0, uid=1000, gid=1000)
    assert owners.decide(mine, notes) == (-1, -1, 0o4755)
    notes.flush()
    assert [(n.kind, n.path) for n in seen] == [("mode", "bin/tool"), ("owner", "bin/tool")]
    assert "setuid bit dropped" in seen[0].message


def test_root_sets_only_what_differs_from_a_new_file() -> None:
    if os.geteuid() != 0:
        return
    owners = Owners(numeric_ids=True)
    notes, seen = _notes()
    assert owners.decide(Entry(1, "f", "a", 1, 0o644, 0, uid=0, gid=0), notes) == \
        (-1, -1, 0o644)
    assert owners.decide(Entry(2, "f", "b", 1, 0o6755, 0, uid=7, gid=8), notes) == \
        (7, 8, 0o6755)
    assert seen == []
