"""query-qmp-schema, as QEMU's introspection clients (libvirt) read it.

- a schema checker: every type a command, event or member names is
  described once, with the fields of its meta-type; unions' tags are enum
  members whose values cover the variants; enums list their values;
  alternates' types differ in JSON type. It runs on qemu-storage-daemon's
  schema too (BLKGRAPH_TEST_QSD=1), which proves the checker;
- completeness: the schema's commands are query-commands' list, and for
  blkgraph exactly the commands, events and transaction actions it has (by
  area, below: query-commands comes from the same table, so a command
  missing from both would go unnoticed by the comparison alone); a
  command that is also a transaction action takes the same type as both;
- self-consistency with the daemon: every argument member the schema
  declares is accepted (its value may be refused, never the key), an
  undeclared one is refused; blockdev-add's driver enum lists exactly the
  drivers blockdev-add accepts;
- shapes against QSD's own schema: every command and event both have takes
  no argument member and returns no member QSD's lacks (blkgraph's
  extensions, x- and __org.blkgraph_, aside).
"""

import shutil

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from conftest import running

META_FIELDS = {
    "builtin": {"json-type"},
    "enum": {"members"},
    "array": {"element-type"},
    "object": {"members"},
    "alternate": {"members"},
    "command": {"arg-type", "ret-type"},
    "event": {"arg-type"},
}
JSON_TYPES = {"string", "number", "int", "boolean", "null", "object", "array", "value"}
EXTENSION = ("x-", "__org.blkgraph")
# blkgraph extensions older than that naming rule: (command, case, member).
OLD_EXTENSIONS = {("blockdev-add", "throttle", "limits")}

# What blkgraph has, by area.
COMMANDS = {
    "protocol": {"qmp_capabilities", "query-commands", "getfd", "closefd", "quit"},
    "queries": {
        "query-version",
        "query-qmp-schema",
        "query-named-block-nodes",
        "x-debug-query-block-graph",
        "query-blockstats",
        "block-latency-histogram-set",
    },
    "nodes": {
        "blockdev-add",
        "blockdev-del",
        "blockdev-reopen",
        "x-blockdev-replace",
        "transaction",
        "block_resize",
        "block-set-write-threshold",
        "blockdev-snapshot",
        "blockdev-snapshot-sync",
    },
    "exports": {
        "block-export-add",
        "block-export-del",
        "query-block-exports",
        "nbd-server-start",
        "nbd-server-stop",
        "nbd-server-add",
        "nbd-server-remove",
    },
    "objects": {"object-add", "object-del"},
    "bitmaps": {
        "block-dirty-bitmap-add",
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-merge",
    },
    "jobs": {
        "query-jobs",
        "query-block-jobs",
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-complete",
        "job-finalize",
        "job-dismiss",
        "block-job-pause",
        "block-job-resume",
        "block-job-cancel",
        "block-job-complete",
        "block-job-finalize",
        "block-job-dismiss",
        "block-job-set-speed",
        "blockdev-backup",
        "blockdev-mirror",
        "blockdev-create",
        "block-stream",
        "block-commit",
    },
}
EVENTS = {
    "BLOCK_EXPORT_DELETED",
    "BLOCK_WRITE_THRESHOLD",
    "__org.blkgraph_SNAPSHOT_BROKEN",
    "__org.blkgraph_BLOCK_DIRTY_BITMAP_LOST",
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_PENDING",
}
ACTIONS = {
    "abort",
    "blockdev-add",
    "blockdev-del",
    "x-blockdev-replace",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
}


@pytest.fixture
def qmp(qmp_daemon):
    q = QEMUMonitorProtocol(str(qmp_daemon.qmp))
    q.connect()
    yield q
    q.close()


class Schema:
    """A SchemaInfo list, by name."""

    def __init__(self, entries: list):
        self.entries = entries
        self.by_name = {}
        self.duplicates = []
        for e in entries:
            if e["name"] in self.by_name:
                self.duplicates.append(e["name"])
            self.by_name[e["name"]] = e

    def __getitem__(self, name):
        return self.by_name[name]

    def commands(self) -> dict:
        return {e["name"]: e for e in self.entries if e["meta-type"] == "command"}

    def events(self) -> dict:
        return {e["name"]: e for e in self.entries if e["meta-type"] == "event"}

    def members(self, type_name: str, case=None) -> dict:
        """An object's members (name -> entry), with variant `case`'s."""
        t = self[type_name]
        members = {m["name"]: m for m in t.get("members", [])}
        for v in t.get("variants", []):
            if case is None or v["case"] == case:
                members.update(self.members(v["type"]))
        return members

    def json_type(self, type_name: str) -> str:
        t = self[type_name]
        return {
            "builtin": lambda: t["json-type"],
            "enum": lambda: "string",
            "array": lambda: "array",
            "object": lambda: "object",
        }.get(t["meta-type"], lambda: "value")()


def check_schema(schema: Schema) -> list:
    """What is wrong with a schema (an empty list if nothing is)."""
    problems = [f"{n} described twice" for n in schema.duplicates]

    def ref(owner, name):
        if name not in schema.by_name:
            problems.append(f"{owner} names {name!r}, which is not described")
            return False
        return True

    for e in schema.entries:
        name, meta = e["name"], e["meta-type"]
        missing = META_FIELDS.get(meta, {"?"}) - set(e)
        if missing:
            problems.append(f"{name} ({meta}) lacks {sorted(missing)}")
            continue
        if meta == "builtin" and e["json-type"] not in JSON_TYPES:
            problems.append(f"{name}: json-type {e['json-type']!r}")
        elif meta == "enum":
            names = [m["name"] for m in e["members"]]
            if len(set(names)) != len(names):
                problems.append(f"{name}: a value twice")
            if "values" in e and e["values"] != names:
                problems.append(f"{name}: values and members differ")
        elif meta == "array":
            ref(name, e["element-type"])
            if name != f"[{e['element-type']}]":
                problems.append(f"array {name} of {e['element-type']}")
        elif meta == "object":
            members = {}
            for m in e["members"]:
                if m["name"] in members:
                    problems.append(f"{name}: member {m['name']} twice")
                members[m["name"]] = m
                ref(name, m["type"])
            if "variants" in e:
                tag = members.get(e.get("tag"))
                if tag is None or not ref(name, tag["type"]):
                    problems.append(f"{name}: tag {e.get('tag')!r} is no member")
                    continue
                enum = schema[tag["type"]]
                if enum["meta-type"] != "enum":
                    problems.append(f"{name}: tag {e['tag']} is no enum")
                    continue
                values = {m["name"] for m in enum["members"]}
                for v in e["variants"]:
                    if v["case"] not in values:
                        problems.append(f"{name}: case {v['case']} not in {tag['type']}")
                    if ref(name, v["type"]) and schema[v["type"]]["meta-type"] != "object":
                        problems.append(f"{name}: variant {v['case']} is no object")
        elif meta == "alternate":
            kinds = [schema.json_type(m["type"]) for m in e["members"] if ref(name, m["type"])]
            if len(set(kinds)) != len(kinds):
                problems.append(f"{name}: two members of one JSON type {kinds}")
        elif meta in ("command", "event"):
            for key in ("arg-type", "ret-type"):
                if key in e and ref(name, e[key]) and key == "arg-type":
                    if schema[e[key]]["meta-type"] != "object":
                        problems.append(f"{name}: arguments of type {schema[e[key]]['meta-type']}")
    return problems


def test_schema_checker_finds_faults():
    """The checker itself: each fault of a small schema is reported."""
    good = [
        {"name": "cmd", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
        {"name": "0", "meta-type": "object", "members": []},
        {"name": "1", "meta-type": "object", "tag": "kind",
         "members": [{"name": "kind", "type": "2"}], "variants": [{"case": "a", "type": "0"}]},
        {"name": "2", "meta-type": "enum", "members": [{"name": "a"}], "values": ["a"]},
        {"name": "str", "meta-type": "builtin", "json-type": "string"},
    ]  # fmt: skip
    assert check_schema(Schema(good)) == []
    bad = [dict(e) for e in good]
    bad[0]["ret-type"] = "9"
    bad[2] = dict(bad[2], variants=[{"case": "b", "type": "0"}])
    bad.append({"name": "3", "meta-type": "alternate",
                "members": [{"type": "str"}, {"type": "2"}]})  # fmt: skip
    bad.append(good[1])
    problems = check_schema(Schema(bad))
    assert any("'9'" in p for p in problems), problems
    assert any("case b" in p for p in problems), problems
    assert any("one JSON type" in p for p in problems), problems
    assert any("twice" in p for p in problems), problems


def transaction_actions(schema: Schema) -> dict:
    """The transaction actions: type -> the type of their data."""
    actions = schema.members(schema.commands()["transaction"]["arg-type"])["actions"]
    action = schema[schema[actions["type"]]["element-type"]]
    return {v["case"]: schema.members(v["type"])["data"]["type"] for v in action["variants"]}


def test_schema_is_complete_and_consistent(qmp, daemon_kind):
    schema = Schema(qmp.cmd("query-qmp-schema"))
    assert check_schema(schema) == []
    names = {c["name"] for c in qmp.cmd("query-commands")}
    assert set(schema.commands()) == names
    if daemon_kind != "blkgraph":
        return
    expected = set().union(*COMMANDS.values())
    assert set(schema.commands()) == expected, (
        f"missing {expected - set(schema.commands())}, "
        f"unexpected {set(schema.commands()) - expected}"
    )
    assert set(schema.events()) == EVENTS
    actions = transaction_actions(schema)
    assert set(actions) == ACTIONS
    for name, data in actions.items():
        if name in schema.commands():
            assert schema.commands()[name]["arg-type"] == data, name


def dummy(schema: Schema, type_name: str):
    """A value of the type's JSON type."""
    t = schema[type_name]
    if t["meta-type"] == "enum":
        return t["members"][0]["name"]
    if t["meta-type"] == "alternate":
        return dummy(schema, t["members"][0]["type"])
    return {"string": "x", "int": 1, "number": 1, "boolean": False, "array": [],
            "object": {}, "null": None}.get(schema.json_type(type_name), "x")  # fmt: skip


def refused_key(reply: dict, key: str) -> bool:
    desc = reply.get("error", {}).get("desc", "")
    return f"'{key}' is unexpected" in desc or f"Invalid parameter '{key}'" in desc


def missing_required(reply: dict, members: dict) -> bool:
    """Refused for a required member missing (QEMU checks those first)."""
    desc = reply.get("error", {}).get("desc", "")
    return any(f"'{k}' is missing" in desc for k, m in members.items() if "default" not in m)


def undo(qmp, command: str, args: dict, reply: dict) -> None:
    """Removes what a probe created."""
    if "error" in reply:
        return
    if command == "blockdev-add":
        qmp.cmd("blockdev-del", **{"node-name": args["node-name"]})
    elif command == "object-add":
        qmp.cmd("object-del", id=args["id"])


# Commands not probed: they end the daemon or stop its servers.
UNPROBED = {"quit", "nbd-server-stop", "qmp_capabilities", "getfd", "closefd"}


def test_every_declared_member_is_accepted(qmp, daemon_kind):
    """Each argument member the schema declares is a key the command takes;
    an undeclared key is refused."""
    if daemon_kind != "blkgraph":
        pytest.skip("probing QSD's full command set is out of scope")
    schema = Schema(qmp.cmd("query-qmp-schema"))
    probes = 0
    for name, command in sorted(schema.commands().items()):
        if name in UNPROBED:
            continue
        arg = schema[command["arg-type"]]
        tag = arg.get("tag")
        cases = [v["case"] for v in arg.get("variants", [])] or [None]
        for case in cases:
            base = {tag: case} if tag else {}
            if name == "blockdev-add":
                base["node-name"] = f"probe{probes}"
            if name == "object-add":
                base["id"] = f"probe{probes}"
            members = schema.members(command["arg-type"], case)
            for key, m in members.items():
                if key in base:
                    continue
                args = dict(base, **{key: dummy(schema, m["type"])})
                reply = qmp.cmd_raw(name, args)
                assert not refused_key(reply, key), (name, args, reply)
                undo(qmp, name, args, reply)
                probes += 1
            if not tag:
                reply = qmp.cmd_raw(name, dict(base, undeclared=1))
                assert refused_key(reply, "undeclared") or missing_required(reply, members), (
                    name,
                    reply,
                )
    assert probes > 100


def driver_enum(schema: Schema) -> list:
    add = schema[schema.commands()["blockdev-add"]["arg-type"]]
    tag = {m["name"]: m for m in add["members"]}["driver"]
    return [m["name"] for m in schema[tag["type"]]["members"]]


def test_blockdev_add_lists_exactly_its_drivers(qmp, daemon_kind, qsd_schema):
    """Every driver of the enum is one blockdev-add takes; QSD's others are
    refused as values blkgraph does not accept."""
    if daemon_kind != "blkgraph":
        pytest.skip("blkgraph's drivers")
    drivers = driver_enum(Schema(qmp.cmd("query-qmp-schema")))
    assert {"file", "raw", "qcow2", "null-co", "rbd", "nbd"} <= set(drivers)

    def not_accepted(driver):
        reply = qmp.cmd_raw("blockdev-add", {"driver": driver, "node-name": "probe"})
        undo(qmp, "blockdev-add", {"node-name": "probe"}, reply)
        return "does not accept value" in reply.get("error", {}).get("desc", "")

    for d in drivers:
        assert not not_accepted(d), d
    others = set(driver_enum(qsd_schema)) - set(drivers) if qsd_schema else {"vmdk", "iscsi"}
    for d in sorted(others):
        assert not_accepted(d), d


@pytest.fixture(scope="module")
def qsd_schema(tmp_path_factory):
    """qemu-storage-daemon's own schema, if it is installed."""
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        return None
    sock = tmp_path_factory.mktemp("qsd") / "qmp.sock"
    args = [qsd, "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m"]
    with running(args, sock):
        q = QEMUMonitorProtocol(str(sock))
        q.connect()
        schema = Schema(q.cmd("query-qmp-schema"))
        q.close()
        return schema


def shape(schema: Schema, type_name: str, depth=0) -> dict:
    """Member names of an object type, variants included, nested one level."""
    t = schema[type_name]
    if t["meta-type"] == "array":
        return shape(schema, t["element-type"], depth)
    if t["meta-type"] != "object":
        return {}
    out = {}
    for name, m in schema.members(type_name).items():
        out[name] = shape(schema, m["type"], depth + 1) if depth < 1 else {}
    return out


def extra_members(ours: dict, theirs: dict, path="") -> list:
    out = []
    for name, sub in ours.items():
        if name.startswith(EXTENSION):
            continue
        if name not in theirs:
            out.append(path + name)
        else:
            out += extra_members(sub, theirs[name], f"{path}{name}.")
    return out


def test_shapes_match_qsd(qmp, daemon_kind, qsd_schema):
    """Commands and events both have: no argument or result member that QSD's
    schema lacks, and the same names for the events' data."""
    if daemon_kind != "blkgraph":
        pytest.skip("compares blkgraph with QSD")
    if qsd_schema is None:
        pytest.skip("qemu-storage-daemon is not installed")
    ours = Schema(qmp.cmd("query-qmp-schema"))
    shared = sorted(set(ours.commands()) & set(qsd_schema.commands()))
    assert len(shared) >= 25, shared
    for name in shared:
        for key in ("arg-type", "ret-type"):
            a = shape(ours, ours.commands()[name][key])
            b = shape(qsd_schema, qsd_schema.commands()[name][key])
            if name in ("blockdev-add", "object-add", "blockdev-reopen"):
                # Compared per driver / object type below (blockdev-reopen
                # takes a list of blockdev-add's options).
                continue
            assert extra_members(a, b) == [], (name, key)
    for name in set(ours.events()) & set(qsd_schema.events()):
        a = ours.members(ours.events()[name]["arg-type"])
        b = qsd_schema.members(qsd_schema.events()[name]["arg-type"])
        assert set(a) == set(b), name
    for command, tag in (("blockdev-add", "driver"), ("object-add", "qom-type")):
        arg_ours = ours.commands()[command]["arg-type"]
        arg_qsd = qsd_schema.commands()[command]["arg-type"]
        for v in ours[arg_ours]["variants"]:
            a = ours.members(arg_ours, v["case"])
            b = qsd_schema.members(arg_qsd, v["case"])
            extra = [
                k
                for k in set(a) - set(b)
                if not k.startswith(EXTENSION) and (command, v["case"], k) not in OLD_EXTENSIONS
            ]
            assert extra == [], (command, v["case"], extra)
